"""The GPU roofline cost model, its hardware presets and bundled model shapes, against numbers
worked out by hand from the datasheets."""

from __future__ import annotations

import json

import pytest

from csps.costmodel.base import RankWork
from csps.costmodel.hardware import GB, GIB, LINKS, ClusterSpec, gpu_spec
from csps.costmodel.models import model_names, model_shape
from csps.costmodel.roofline import RooflineCostModel


def roofline(cluster="1xA100-80GB", model="llama-2-7b", tp=1, sp=1, overhead=0.0):
    return RooflineCostModel(ClusterSpec.parse(cluster), model_shape(model), tp=tp, sp=sp,
                             iteration_overhead_s=overhead)


def test_cluster_presets_parse_gpus_nodes_and_links():
    c = ClusterSpec.parse("4x8xA100-80GB-ib")
    assert (c.num_nodes, c.gpus_per_node, c.num_gpus) == (4, 8, 32)
    assert c.gpu.hbm_bandwidth == 2039 * GB and c.gpu.memory_bytes == 80 * GIB
    assert (c.intra_node_link.name, c.inter_node_link.name) == ("nvlink3", "ib-hdr")
    h = ClusterSpec.parse("2x8xH100-pcie-ib-ndr")
    assert h.gpu.peak_flops == 989e12
    assert (h.intra_node_link.name, h.inter_node_link.name) == ("pcie5", "ib-ndr")
    assert ClusterSpec.parse("8xH200").intra_node_link.name == "nvlink4"
    assert c.link_for(8).name == "nvlink3" and c.link_for(9).name == "ib-hdr"
    for bad in ("8xB200", "A100", "8xA100-80GB-token-ring"):
        with pytest.raises(ValueError):
            ClusterSpec.parse(bad)


def test_cluster_json_file_round_trips(tmp_path):
    c = ClusterSpec.parse("2x4xA100-40GB-pcie")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(c.to_dict()))
    assert ClusterSpec.parse(str(path)) == c
    path.write_text(json.dumps({"gpu": "H100", "gpus_per_node": 4, "num_nodes": 2,
                                "inter_node_link": "ib-hdr"}))
    c2 = ClusterSpec.parse(str(path))
    assert c2.gpu == gpu_spec("H100-SXM") and c2.inter_node_link == LINKS["ib-hdr"]


@pytest.mark.parametrize("name,params", [("llama-2-7b", 6.74e9), ("llama-3-8b", 8.03e9),
                                         ("mistral-7b", 7.24e9), ("yi-34b-200k", 34.39e9),
                                         ("llama-3-70b", 70.55e9), ("lwm-text-1m", 6.74e9)])
def test_bundled_model_shapes_match_published_parameter_counts(name, params):
    shape = model_shape(name)
    assert shape.weight_bytes / 2 == pytest.approx(params, rel=0.01)
    assert name in model_names()


def test_model_lookup_accepts_hf_spellings_and_refuses_unknown_names():
    assert model_shape("meta-llama/Llama-2-7b-hf").name == "llama-2-7b"
    assert model_shape("Llama-3-8B-262k").num_kv_heads == 8
    with pytest.raises(ValueError, match="unknown model"):
        model_shape("gpt-5")


def test_a_decode_step_of_7b_on_one_a100_is_bound_by_reading_the_weights():
    model = roofline()
    work = RankWork(num_tokens=1, num_seqs=1, num_sampled=1, decode_kv_tokens=1024)
    gpu = model.cluster.gpu
    weights_s = model.shape.weight_bytes / (gpu.hbm_bandwidth * gpu.mbu)  # 13.5 GB / 1.63 TB/s
    kv_s = 1024 * model.shape.kv_bytes_per_token / (gpu.hbm_bandwidth * gpu.mbu)
    assert weights_s == pytest.approx(8.26e-3, rel=0.01)
    assert model.rank_time(work) == pytest.approx(weights_s + kv_s, rel=0.01)
    flops_s = model.shape.linear_flops_per_token / (gpu.peak_flops * gpu.mfu)
    assert flops_s < weights_s / 100  # far below the memory roof


def test_a_32k_prefill_is_compute_bound():
    model = roofline()
    n = 32768
    work = RankWork(num_tokens=n, num_seqs=1, num_sampled=1, attn_pairs=n * (n + 1) / 2)
    gpu, s = model.cluster.gpu, model.shape
    dense_s = (n * s.linear_flops_per_token + s.lm_head_flops) / (gpu.peak_flops * gpu.mfu)
    attn_s = n * (n + 1) / 2 * s.attn_flops_per_pair / (gpu.peak_flops * gpu.attn_mfu)
    assert model.rank_time(work) == pytest.approx(dense_s + attn_s, rel=1e-9)
    assert 3.0 < dense_s + attn_s < 5.0  # ~2.4 s dense + ~1.8 s attention on an A100
    memory_s = (s.weight_bytes + n * model.activation_bytes_per_token) / (
        gpu.hbm_bandwidth * gpu.mbu)
    assert memory_s < dense_s / 5


def test_comm_over_nvlink_vs_infiniband_follows_the_link_bandwidths():
    work = RankWork(comm_bytes={"prefill_attn": 10**9})
    inside = roofline("2x8xA100-80GB-ib", sp=8)  # the SP group fits a node: NVLink only
    across = roofline("2x8xA100-80GB-ib", sp=16)  # 8 of the 15 peers are on the other node
    nvlink_s = 1e9 / (300e9 * 0.8)
    ib_s = 1e9 * 8 / 15 / (25e9 * 0.8)
    assert inside.rank_time(work) == pytest.approx(nvlink_s)
    assert across.rank_time(work) == pytest.approx(ib_s)
    assert across.rank_time(work) / inside.rank_time(work) == pytest.approx(6.4, rel=1e-6)
    tp_work = RankWork(comm_bytes={"tp": 10**9})  # TP stays inside its node either way
    assert roofline("2x8xA100-80GB-ib", tp=2, sp=8).rank_time(tp_work) == pytest.approx(nvlink_s)


def test_latency_per_collective_and_overlap_up_to_the_compute_time():
    model = roofline("8xA100-80GB", sp=8)
    latency = model.cluster.intra_node_link.latency_s
    assert model.rank_time(RankWork(num_collectives=64)) == pytest.approx(64 * latency)
    compute = RankWork(num_tokens=4096, attn_pairs=4096 * 4097 / 2)
    compute_s = model.rank_time(compute)
    comm_s = 2e9 / (300e9 * 0.8)  # 6.7 ms, well under the compute time
    both = RankWork(num_tokens=4096, attn_pairs=4096 * 4097 / 2,
                    comm_bytes={"prefill_attn": 2 * 10**9})
    assert model.rank_time(both) == pytest.approx(compute_s + comm_s)
    hidden = RankWork(num_tokens=4096, attn_pairs=4096 * 4097 / 2,
                      comm_bytes={"prefill_attn": 2 * 10**9}, overlappable_bytes=10**9)
    assert model.rank_time(hidden) == pytest.approx(compute_s + comm_s / 2)
    tiny = RankWork(num_tokens=1, comm_bytes={"prefill_attn": 2 * 10**9},
                    overlappable_bytes=2 * 10**9)  # hidden only up to its compute time
    assert model.rank_time(tiny) == pytest.approx(comm_s)


def test_tensor_parallelism_splits_weights_and_the_iteration_is_the_slowest_rank():
    one, two = roofline("8xA100-80GB", tp=1), roofline("8xA100-80GB", tp=2)
    decode = RankWork(num_tokens=1, num_seqs=1)
    assert two.rank_time(decode) == pytest.approx(one.rank_time(decode) / 2, rel=0.01)
    model = roofline(overhead=1e-3)
    works = [RankWork(), RankWork(num_tokens=1), RankWork(num_tokens=2048)]
    assert model.iteration_time(works) == pytest.approx(model.rank_time(works[2]) + 1e-3)
    with pytest.raises(ValueError):
        roofline("8xA100-80GB", tp=4, sp=4)  # 16 ranks on 8 GPUs


def test_json_round_trip_and_load_cost_model(tmp_path):
    from csps.costmodel.load import load_cost_model

    model = roofline("4x8xH100-ib", model="llama-3-70b", tp=4, sp=8, overhead=2e-3)
    assert RooflineCostModel.from_dict(model.to_dict()) == model
    path = tmp_path / "roofline.json"
    path.write_text(json.dumps({"kind": "roofline", "cluster": "8xA100-80GB-nvlink",
                                "model": "mistral-7b", "tp": 2, "sp": 4}))
    loaded = load_cost_model(path)
    assert isinstance(loaded, RooflineCostModel)
    assert (loaded.tp, loaded.sp, loaded.shape.name) == (2, 4, "mistral-7b")
    with pytest.raises(ValueError):
        RooflineCostModel.from_dict({"cluster": "8xA100", "model": "llama-2-7b",
                                     "dtype": "int3"})
