"""`ostquant generate` and `ostquant bench` on CPU (tiny models, dry runs)."""
from __future__ import annotations

import pytest
import torch

from ostquant import cli
from ostquant.calibrate.pipeline import CalibSettings, quantize_model
from ostquant.models import load_model
from tiny_models import byte_tokenizer, tiny_model

HD64 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, vocab_size=256)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cligen")
    tiny_model("llama", seed=1, **HD64).save_pretrained(d / "m")
    byte_tokenizer().save_pretrained(d / "m")
    model, tok = load_model(str(d / "m"))
    quantize_model(model, tok, "quarot", "w4a4kv4", CalibSettings(qsur_samples=0),
                   out_dir=str(d / "q"), progress=False, model_source=str(d / "m"))
    yield d
    torch.set_num_threads(n)


def test_generate_from_quantized_dir(dirs, capsys):
    assert cli.main(["generate", str(dirs / "q"), "--prompt", "ab", "--prompt", "hello",
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count("-" * 40) == 2 and "quarot w4a4kv4" in cap.err
    assert "tokens/s" in cap.err
    assert cli.main(["generate", str(dirs / "q"), "--prompt", "ab", "--max-new-tokens", "3",
                     "--stream", "--sample", "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_generate_rtn_on_the_fly_and_errors(dirs, capsys):
    assert cli.main(["generate", str(dirs / "m"), "--preset", "w4a16", "--prompt", "x",
                     "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "RTN w4a16kv16 on the fly" in capsys.readouterr().err
    assert cli.main(["generate", str(dirs / "m"), "--device", "cpu"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert cli.main(["generate", str(dirs / "q"), "--max-new-tokens", "0",
                     "--device", "cpu"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_bench_subcommand_dry_run(capsys, tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert cli.main(["bench", "prefill", "--dry-run", "--seqlens", "16"]) == 0
    assert "[dry-run] prefill: ok" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonsense"])
    assert cli._normalize_argv(["bench", "decode", "--quick"]) == ["bench", "decode", "--quick"]


def test_generate_cuda_graph_flag_on_cpu_warns_and_runs(dirs, capsys):
    from ostquant.runtime import CUDAGraphFallbackWarning

    with pytest.warns(CUDAGraphFallbackWarning, match="decoding eagerly"):
        assert cli.main(["generate", str(dirs / "q"), "--prompt", "ab", "--max-new-tokens",
                         "3", "--device", "cpu", "--cuda-graph"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "(CUDA graph)" not in err


def test_generate_continuous_batching_flag(dirs, capsys):
    args = ["generate", str(dirs / "q"), "--prompt", "ab", "--prompt", "hello", "--prompt",
            "xyz", "--max-new-tokens", "4", "--device", "cpu"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main(args + ["--batch-size", "2"]) == 0
    cap = capsys.readouterr()
    assert cap.out == plain and "3 prompts through 2 slots" in cap.err
    assert cli.main(args + ["--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert cli.main(args + ["--batch-size", "2", "--cuda-graph"]) == 2
    assert "do not go together" in capsys.readouterr().err
    assert cli.main(args + ["--batch-size", "2", "--prefill-chunk", "2"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.main(args + ["--prefill-chunk", "2"]) == 2
    assert "needs --batch-size" in capsys.readouterr().err
