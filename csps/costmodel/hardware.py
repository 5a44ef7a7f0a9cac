"""GPUs, links and clusters for the roofline cost model, peak rates from vendor datasheets.
No torch.

A `ClusterSpec` is named like `8xA100-80GB-nvlink` (one node of 8 GPUs) or
`4x8xH100-nvlink-ib` (4 nodes of 8): `[NODESx]GPUSxGPU[-LINK...]`, where a LINK token names the
intra-node link (nvlink, nvlink3, nvlink4, pcie, pcie4, pcie5) or the inter-node one (ib,
ib-hdr / hdr, ib-ndr / ndr); the defaults are the GPU generation's NVLink and InfiniBand. A small
JSON file with the same fields (`gpu`, `gpus_per_node`, `num_nodes`, `intra_node_link`,
`inter_node_link`; names or dicts of the spec fields) describes anything else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

GB = 10**9  # datasheets quote decimal gigabytes per second
GIB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    """One GPU. Peak numbers are the datasheets' (SXM parts, dense bf16, no sparsity); the
    achievable fractions are what large GEMMs / flash attention / streaming reads commonly reach
    (around 60-80% of peak in published kernel benchmarks) and are the knobs validation fits."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int
    mfu: float = 0.6  # achievable fraction of peak_flops in the dense layers
    attn_mfu: float = 0.5  # achievable fraction of peak_flops in prefill attention
    mbu: float = 0.8  # achievable fraction of hbm_bandwidth

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.hbm_bandwidth, self.memory_bytes) <= 0:
            raise ValueError(f"GPU {self.name!r}: rates and memory must be positive")
        for name in ("mfu", "attn_mfu", "mbu"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"GPU {self.name!r}: {name} must be in (0, 1]")


@dataclass(frozen=True)
class LinkSpec:
    """A link as one GPU sees it: bandwidth per direction per GPU, and the latency of one
    collective step (NCCL's small-message latency is of this order)."""

    name: str
    bandwidth: float  # bytes/s per direction per GPU (nominal)
    latency_s: float  # seconds per collective call
    efficiency: float = 0.8  # achievable fraction of the nominal bandwidth (NCCL bus bandwidth)

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency_s < 0 or not 0 < self.efficiency <= 1:
            raise ValueError(f"link {self.name!r}: bad bandwidth, latency or efficiency")

    def transfer_time(self, num_bytes: float, num_calls: int) -> float:
        return num_bytes / (self.bandwidth * self.efficiency) + num_calls * self.latency_s


# NVIDIA A100 datasheet (SXM): 312 TFLOPS bf16 dense; 1,555 GB/s (40GB), 2,039 GB/s (80GB).
# H100 SXM datasheet: 989 TFLOPS bf16 dense (1,979 with sparsity), 3.35 TB/s, 80 GB.
# H200 SXM datasheet: same compute as H100, 4.8 TB/s, 141 GB.
GPUS = {g.name: g for g in (
    GpuSpec("A100-40GB", 312e12, 1555 * GB, 40 * GIB),
    GpuSpec("A100-80GB", 312e12, 2039 * GB, 80 * GIB),
    GpuSpec("H100-SXM", 989e12, 3350 * GB, 80 * GIB),
    GpuSpec("H200", 989e12, 4800 * GB, 141 * GB),
)}
GPU_ALIASES = {"A100": "A100-80GB", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB",
               "H100": "H100-SXM", "H100-80GB": "H100-SXM", "H200-SXM": "H200"}

# NVLink 3 (A100): 600 GB/s total per GPU = 300 per direction; NVLink 4 (H100): 900 = 450.
# PCIe x16: gen4 ~32 GB/s, gen5 ~64 GB/s per direction. InfiniBand, one HCA per GPU as in
# DGX A100 / H100: HDR 200 Gb/s = 25 GB/s, NDR 400 Gb/s = 50 GB/s per direction.
LINKS = {link.name: link for link in (
    LinkSpec("nvlink3", 300 * GB, 5e-6),
    LinkSpec("nvlink4", 450 * GB, 5e-6),
    LinkSpec("pcie4", 32 * GB, 10e-6),
    LinkSpec("pcie5", 64 * GB, 10e-6),
    LinkSpec("ib-hdr", 25 * GB, 10e-6),
    LinkSpec("ib-ndr", 50 * GB, 10e-6),
)}
LINK_ALIASES = {"hdr": "ib-hdr", "ndr": "ib-ndr"}
INTRA_NODE = ("nvlink", "nvlink3", "nvlink4", "pcie", "pcie4", "pcie5")
INTER_NODE = ("ib", "ib-hdr", "ib-ndr", "hdr", "ndr")


def gpu_spec(name: str) -> GpuSpec:
    key = next((k for k in GPUS if k.lower() == name.lower()), None)
    key = key or next((v for k, v in GPU_ALIASES.items() if k.lower() == name.lower()), None)
    if key is None:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPUS)}")
    return GPUS[key]


def _link(token: str, gpu: GpuSpec) -> LinkSpec:
    """A link by name; bare nvlink / pcie / ib take the GPU generation's version."""
    hopper = gpu.name.startswith(("H100", "H200"))
    generic = {"nvlink": "nvlink4" if hopper else "nvlink3", "pcie": "pcie5" if hopper else "pcie4",
               "ib": "ib-ndr" if hopper else "ib-hdr"}
    name = generic.get(token, LINK_ALIASES.get(token, token))
    if name not in LINKS:
        raise ValueError(f"unknown link {token!r}; known: {sorted(LINKS)} or nvlink/pcie/ib")
    return LINKS[name]


@dataclass(frozen=True)
class ClusterSpec:
    """num_nodes nodes of gpus_per_node identical GPUs; ranks fill a node before the next."""

    gpu: GpuSpec
    gpus_per_node: int
    num_nodes: int
    intra_node_link: LinkSpec
    inter_node_link: LinkSpec
    name: str = ""

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.num_nodes < 1:
            raise ValueError("gpus_per_node and num_nodes must be positive")

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    def link_for(self, group_size: int) -> LinkSpec:
        """The slowest link a group of `group_size` consecutive ranks crosses."""
        return self.inter_node_link if group_size > self.gpus_per_node else self.intra_node_link

    @classmethod
    def parse(cls, name: str) -> ClusterSpec:
        """From a preset name (module docstring) or the path of a JSON file."""
        if name.endswith(".json") or Path(name).is_file():
            return cls.from_dict(json.loads(Path(name).read_text()), name=Path(name).stem)
        match = re.fullmatch(r"(?:(\d+)x)?(\d+)x([A-Za-z0-9]+(?:-(?:\d+GB?|SXM))?)((?:-[\w-]+)?)",
                             name.strip())
        if match is None:
            raise ValueError(f"bad cluster name {name!r}: want [NODESx]GPUSxGPU[-LINK...], "
                             f"e.g. 8xA100-80GB-nvlink or 4x8xH100-nvlink-ib")
        nodes, per_node, gpu_name, links = match.groups()
        gpu = gpu_spec(gpu_name)
        intra, inter = _link("nvlink", gpu), _link("ib", gpu)
        for token in _link_tokens(links):
            if token in INTRA_NODE:
                intra = _link(token, gpu)
            elif token in INTER_NODE:
                inter = _link(token, gpu)
            else:
                raise ValueError(f"cluster {name!r}: unknown link {token!r}; use one of "
                                 f"{INTRA_NODE + INTER_NODE}")
        return cls(gpu, int(per_node), int(nodes or 1), intra, inter, name=name)

    @classmethod
    def from_dict(cls, data: dict, name: str = "") -> ClusterSpec:
        gpu = data["gpu"]
        gpu = gpu_spec(gpu) if isinstance(gpu, str) else GpuSpec(**gpu)

        def link(key: str, default: str) -> LinkSpec:
            value = data.get(key, default)
            return _link(value, gpu) if isinstance(value, str) else LinkSpec(**value)

        return cls(gpu, int(data.get("gpus_per_node", 8)), int(data.get("num_nodes", 1)),
                   link("intra_node_link", "nvlink"), link("inter_node_link", "ib"),
                   name=data.get("name", name))

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"name": self.name, "gpu": asdict(self.gpu), "gpus_per_node": self.gpus_per_node,
                "num_nodes": self.num_nodes, "intra_node_link": asdict(self.intra_node_link),
                "inter_node_link": asdict(self.inter_node_link)}


def _link_tokens(text: str) -> list[str]:
    """'-nvlink-ib-hdr' -> ['nvlink', 'ib-hdr']: ib-hdr / ib-ndr stay one token."""
    tokens = [t.lower() for t in text.split("-") if t]
    merged: list[str] = []
    for token in tokens:
        if token in ("hdr", "ndr") and merged and merged[-1] == "ib":
            merged[-1] = f"ib-{token}"
        else:
            merged.append(token)
    return merged
