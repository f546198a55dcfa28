"""The bookkeeping of the GPU benchmarks (tables, routing settings), checked on any machine: a GPU session
is short, and a benchmark that dies after its measurements while writing them loses them."""

import os

import pytest

import bench_gpu_gemm
import bench_gpu_generate


def _gemm_row(m, kernel, **extra):
    row = {"K": 4096, "N": 4096, "M": m, "kernel": kernel, "gptqkit_us": 10.0, "fp16_us": 16.0,
           "tinygemm_us": 7.0, "speedup_vs_fp16": 1.6, "speedup_vs_tinygemm": 0.7}
    row.update(extra)
    return row


def test_gemm_table_rows_have_every_column(tmp_path):
    rows = [_gemm_row(1, "mma", gptqkit_GBps=800.0, gemv_us=12.0, skinny_us=9.0, inkernel_reduce_us=8.5,
                      pdl_us=8.0),
            _gemm_row(16, "skinny", mma_small_us=11.0, separate_reduce_us=9.5, ordinary_launch_us=9.9,
                      unsplit_us=20.0),
            _gemm_row(64, "mma", unsplit_us=59.0, wgmma_us=15.5),
            _gemm_row(128, "wgmma", unsplit_us=30.0, kernel_us=23.0, mma_us=28.0, dense_us=26.0),
            _gemm_row(1024, "dense", tinygemm_us=None, speedup_vs_tinygemm=None, unsplit_us=124.0, kernel_us=124.0,
                      dense_us=61.0)]
    path = tmp_path / "gemm.md"
    bench_gpu_gemm.write_table(rows, str(path), {"gpu": "GPU", "torch": "2.13", "reps": 20, "calls": 20,
                                                 "l2_mib": 50.0, "act_order": False,
                                                 "routing_env": {"GPTQKIT_GPU_PDL": "1"}})
    lines = path.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert len({line.count("|") for line in table}) == 1, "every row needs the header's column count"
    header = [c.strip() for c in table[0].strip("|").split("|")]
    first = [c.strip() for c in table[2].strip("|").split("|")]
    assert first[header.index("in-kernel / separate reduce (us)")] == "8.5"
    assert first[header.index("PDL / ordinary launches (us)")] == "8.0"
    second = [c.strip() for c in table[3].strip("|").split("|")]
    assert second[header.index("in-kernel / separate reduce (us)")] == "9.5"
    assert second[header.index("skinny / mma kernel (us)")] == "11.0"
    third = [c.strip() for c in table[4].strip("|").split("|")]
    assert third[header.index("mma.sync / wgmma (us)")] == "15.5" and third[header.index("native kernel (us)")] == ""
    fourth = [c.strip() for c in table[5].strip("|").split("|")]
    assert fourth[header.index("mma.sync / wgmma (us)")] == "28.0"
    assert fourth[header.index("dequantize + cuBLAS (us)")] == "26.0"
    assert "GPTQKIT_GPU_PDL=1" in lines[0]


def test_generate_routing_settings_are_parsed_and_checked():
    assert bench_gpu_generate.parse_routing("default") == {}
    assert bench_gpu_generate.parse_routing("GPTQKIT_GPU_PDL=1,GPTQKIT_GPU_SKINNY_MAX_ROWS=16") == {
        "GPTQKIT_GPU_PDL": "1", "GPTQKIT_GPU_SKINNY_MAX_ROWS": "16"}
    for bad in ("PDL=1", "GPTQKIT_GPU_PDL", "GPTQKIT_GPU_PDL=1,HOME=/"):
        with pytest.raises(SystemExit, match="--routing"):
            bench_gpu_generate.parse_routing(bad)


def test_generate_routing_env_sets_restores_and_recompiles(gptqkit, monkeypatch):
    class Model:
        pass

    model = Model()
    model._compiled_call = object()  # transformers' cached compiled decode step
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "4")
    monkeypatch.delenv("GPTQKIT_GPU_PDL", raising=False)
    with bench_gpu_generate.routing_env(model, {"GPTQKIT_GPU_SKINNY_MAX_ROWS": "16", "GPTQKIT_GPU_PDL": "1"}):
        assert os.environ["GPTQKIT_GPU_SKINNY_MAX_ROWS"] == "16" and os.environ["GPTQKIT_GPU_PDL"] == "1"
        assert "_compiled_call" not in model.__dict__, "a new setting must be captured again"
        model._compiled_call = object()
    assert os.environ["GPTQKIT_GPU_SKINNY_MAX_ROWS"] == "4" and "GPTQKIT_GPU_PDL" not in os.environ
    assert "_compiled_call" not in model.__dict__
    with pytest.raises(ValueError, match="GPTQKIT_GPU_PDL"):
        with bench_gpu_generate.routing_env(model, {"GPTQKIT_GPU_PDL": "maybe"}):
            pass
    assert "GPTQKIT_GPU_PDL" not in os.environ


def test_generate_table_names_each_setting():
    labels = ["fp16", "gptqkit-fused [default]", "gptqkit-fused [GPTQKIT_GPU_PDL=1]"]
    results = {(label, batch): 100.0 + 10 * i + batch for i, label in enumerate(labels) for batch in (1, 16)}
    lines = bench_gpu_generate.table_lines(labels, results, [1, 16])
    assert "gptqkit 4-bit fused [GPTQKIT_GPU_PDL=1] speed-up" in lines[0]
    assert lines[2] == "| 1 | 101.0 | 111.0 | 121.0 | 1.10x | 1.20x |"
    assert len({line.count("|") for line in lines}) == 1
    alone = bench_gpu_generate.table_lines(["gptqkit"], {("gptqkit", 1): 5.0}, [1])
    assert alone[2] == "| 1 | 5.0 |"
