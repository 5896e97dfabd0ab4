"""End-to-end pipeline: quantize_model (rtn/quarot/spinquant/ostquant), the saved directory,
load_quantized, and the `quantize`/`eval` CLI commands — on a tiny random llama."""
import dataclasses
import json
import os

import pytest
import torch

from ostquant import cli
from ostquant.calibrate.pipeline import (CalibSettings, QuantizedModelError, load_quantized,
                                         quantize_model)
from ostquant.models import load_model
from tiny_models import save_tiny_checkpoint

CALIB = CalibSettings(steps=2, nsamples=4, seqlen=32, batch_size=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a loaded 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinypipe")
    save_tiny_checkpoint(d / "model")
    text = d / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog."
                                for i in range(40)))
    return d


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _data():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def saved(tiny_dir, ids):
    """Every method at w4a4kv4, saved; in-memory logits kept for comparison."""
    out = {}
    for method in ("rtn", "quarot", "spinquant", "ostquant"):
        model, tok = load_model(str(tiny_dir / "model"))
        d = tiny_dir / f"q_{method}"
        qm, info = quantize_model(model, tok, method, "w4a4kv4", CALIB, out_dir=str(d),
                                  progress=False, calib_data=_data())
        out[method] = (d, _logits(qm, ids), info)
    return out


@pytest.mark.parametrize("method", ["rtn", "quarot", "spinquant", "ostquant"])
def test_method_runs_saves_and_reloads_exactly(saved, ids, method):
    d, logits, info = saved[method]
    assert torch.isfinite(logits).all()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["method"] == method and cfg["preset"] == "w4a4kv4"
    assert cfg["quant_config"]["kvbits"] == 4 and "ostquant_version" in cfg
    if method in ("spinquant", "ostquant"):
        assert cfg["training"]["steps"] == 2 and cfg["training"]["mean_step_s"] > 0
        assert (d / "calib" / "ckpt.pt").is_file()
    if method != "rtn":
        assert cfg["online_hadamards"] == {"down_proj": True, "q_k": True}
    model, tok = load_quantized(str(d))
    assert torch.equal(_logits(model, ids), logits)


def test_transform_configs(saved):
    t = saved["quarot"][2]["transform_config"]
    assert t["r_res"] and t["r_ov"] and not t["s_res"] and not t["s_qk"]
    assert t["r_res_init"] == "random_hadamard" and t["r_ov_init"] == "hadamard"
    # the method's default loss is resolved and recorded (a saved run says what it trained on)
    assert saved["spinquant"][2]["calibration"]["loss"] == "ce"
    assert saved["ostquant"][2]["calibration"]["loss"] == "kl_top"
    # fake-quantizer backward: SpinQuant's plain STE; range-aware for OSTQuant's scalings
    assert saved["spinquant"][2]["calibration"]["quant_grad"] == "ste"
    assert saved["ostquant"][2]["calibration"]["quant_grad"] == "range"
    cfg = json.loads((saved["ostquant"][0] / "config.json").read_text())
    assert cfg["calibration"]["quant_grad"] == "range"
    o = saved["ostquant"][2]["transform_config"]
    assert all(o[k] for k in ("r_res", "s_res", "r_ov", "s_ov", "s_qk", "s_up_down"))
    # 4-bit activations: random-Hadamard R_res, Hadamard R_ov; weight-only: WOMI.
    assert o["r_res_init"] == "random_hadamard" and o["r_ov_init"] == "hadamard"
    from ostquant.calibrate.pipeline import transform_config_for
    from ostquant.quant import get_preset
    w = transform_config_for("ostquant", get_preset("w4a16kv16"))
    assert w.r_res_init == "womi" and w.r_ov_init == "identity" and not w.qk_hadamard
    assert transform_config_for("ostquant", get_preset("w4a4kv4")).qk_hadamard


def test_default_loss_per_method_and_preset():
    from ostquant.calibrate.pipeline import loss_for
    from ostquant.quant import get_preset

    assert [loss_for("ostquant", p) for p in ("w4a16kv16", "w4a4kv16", "w4a4kv4")] == \
        ["ce", "kl_top", "kl_top"]
    assert loss_for("ostquant", get_preset("w4a16")) == "ce"
    assert all(loss_for("spinquant", p) == "ce" for p in ("w4a16kv16", "w4a4kv4"))
    with pytest.raises(ValueError, match="not trained"):
        loss_for("quarot", "w4a4kv4")


def test_explicit_loss_is_kept(tiny_dir):
    model, tok = load_model(str(tiny_dir / "model"))
    calib = dataclasses.replace(CALIB, loss="kl_top", steps=1)
    _, info = quantize_model(model, tok, "ostquant", "w4a16kv16", calib, progress=False,
                             calib_data=_data())
    assert info["calibration"]["loss"] == "kl_top"
    model, tok = load_model(str(tiny_dir / "model"))
    _, info = quantize_model(model, tok, "ostquant", "w4a16kv16",
                             dataclasses.replace(CALIB, steps=1), progress=False,
                             calib_data=_data())
    assert info["calibration"]["loss"] == "ce"


def test_quarot_without_quantization_is_exact(tiny_dir, ids):
    model, tok = load_model(str(tiny_dir / "model"))
    ref = _logits(model, ids)
    qm, info = quantize_model(model, tok, "quarot", "w16a16kv16", CALIB, progress=False)
    assert info["transform_config"]["r_res"]
    torch.testing.assert_close(_logits(qm, ids), ref, atol=2e-4, rtol=1e-4)


def test_teacher_is_original_model(tiny_dir, ids):
    """The quant-off teacher used in training equals the original model (one model copy)."""
    from ostquant.calibrate.pipeline import _plain_model, transform_config_for
    from ostquant.quant import get_preset
    from ostquant.transforms import (OSTParams, apply_training_transforms, prepare_model,
                                     set_training_quant)

    model, _ = load_model(str(tiny_dir / "model"))
    ref = _logits(model, ids)
    cfg = get_preset("w4a4kv4")
    prepare_model(model)
    params = OSTParams(model, transform_config_for("ostquant", cfg)).randomize_(seed=3,
                                                                                scale_std=0.1)
    apply_training_transforms(model, params, cfg, weight_clip="cached")
    q1 = _logits(model, ids)
    set_training_quant(model, None)
    t = _logits(model, ids)
    set_training_quant(model, cfg)
    torch.testing.assert_close(t, ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(_logits(model, ids), q1)  # quantizers restored afterwards
    with _plain_model(model):
        t2 = _logits(model, ids)
    torch.testing.assert_close(t2, ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(_logits(model, ids), q1)  # wrappers restored afterwards
    assert not torch.allclose(q1, ref, atol=1e-3)


def test_resume_finished_calibration(tiny_dir, saved):
    d, _, info = saved["ostquant"]
    model, tok = load_model(str(tiny_dir / "model"))
    _, info2 = quantize_model(model, tok, "ostquant", "w4a4kv4", CALIB, out_dir=str(d),
                              progress=False, calib_data=_data())
    assert info2["training"]["resumed_from"] == 2
    assert info2["training"]["losses"] == info["training"]["losses"]


def _decoder_output_error(model, fp_logits, data):
    with torch.no_grad():
        return float((model(input_ids=data).logits - fp_logits).pow(2).mean())


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_gptq_beats_round_to_nearest(tiny_dir, method):
    """GPTQ'd weights (same grid) track the FP model more closely on the calibration data
    than round-to-nearest, for a plain model and for a fused one (online down Hadamard)."""
    from ostquant.nn import QuantLinear

    data = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    fp, _ = load_model(str(tiny_dir / "model"))
    with torch.no_grad():
        ref = fp(input_ids=data).logits
    errs, models = {}, {}
    for gptq in (False, True):
        model, tok = load_model(str(tiny_dir / "model"))
        calib = CalibSettings(nsamples=8, seqlen=32, gptq=gptq)
        qm, info = quantize_model(model, tok, method, "w4a16", calib, progress=False,
                                  calib_data=data)
        errs[gptq], models[gptq] = _decoder_output_error(qm, ref, data), qm
        assert ("gptq_s" in info["timings"]) == gptq
    assert errs[True] < errs[False], errs
    a = dict(models[False].named_modules())
    downs = 0
    for name, m in models[True].named_modules():
        if isinstance(m, QuantLinear):
            r = a[name]
            assert isinstance(r, QuantLinear) and r.online_hadamard == m.online_hadamard
            torch.testing.assert_close(m.w_scale, r.w_scale)  # same grid, other codes
            downs += m.online_hadamard
    assert downs == (0 if method == "rtn" else 2)
    assert not torch.equal(next(m.qweight for m in models[True].modules()
                                if isinstance(m, QuantLinear)),
                           next(m.qweight for m in models[False].modules()
                                if isinstance(m, QuantLinear)))


def test_gptq_saved_and_loaded(tiny_dir, tmp_path, ids):
    model, tok = load_model(str(tiny_dir / "model"))
    calib = CalibSettings(nsamples=4, seqlen=32, gptq=True)
    qm, info = quantize_model(model, tok, "quarot", "w4a4kv4", calib, out_dir=str(tmp_path / "g"),
                              progress=False, calib_data=_data())
    assert info["calibration"]["gptq"] is True
    loaded, _ = load_quantized(str(tmp_path / "g"))
    torch.testing.assert_close(_logits(loaded, ids), _logits(qm, ids))


def test_gptq_bad_input(tiny_dir):
    from ostquant.calibrate.gptq_pass import apply_gptq

    model, tok = load_model(str(tiny_dir / "model"))
    with pytest.raises(ValueError, match="needs quantized weights"):
        quantize_model(model, tok, "rtn", "w16a16kv16", CalibSettings(gptq=True), progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        apply_gptq(model, "w4a16", torch.zeros(2, 8))
    with pytest.raises(ValueError, match="LongTensor"):
        apply_gptq(model, "w4a16", torch.zeros(0, 8, dtype=torch.long))


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_directories(saved, tmp_path):
    src = saved["rtn"][0]
    with pytest.raises(QuantizedModelError, match="not a directory"):
        load_quantized(str(tmp_path / "nope"))
    d = _copy(src, tmp_path / "a")
    (d / "config.json").write_text("{not json")
    with pytest.raises(QuantizedModelError, match="not valid JSON"):
        load_quantized(str(d))
    d = _copy(src, tmp_path / "b")
    (d / "config.json").unlink()
    with pytest.raises(QuantizedModelError, match="config.json.*missing"):
        load_quantized(str(d))
    d = _copy(src, tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(QuantizedModelError, match="model.safetensors.*missing"):
        load_quantized(str(d))
    d = _copy(src, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizedModelError, match="version"):
        load_quantized(str(d))
    d = _copy(src, tmp_path / "e")
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(QuantizedModelError, match="safetensors"):
        load_quantized(str(d))


def test_checkpoint_of_another_model(saved, tmp_path):
    from tiny_models import byte_tokenizer, tiny_model

    other = tmp_path / "other"
    tiny_model("llama", vocab_size=256, intermediate_size=192).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    d = _copy(saved["quarot"][0], tmp_path / "q")
    with pytest.raises(QuantizedModelError, match="does not match|is 64->|->"):
        load_quantized(str(d), model_source=str(other))


def test_cli_quantize_and_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    argv = ["quantize", "--model", str(tiny_dir / "model"), "--preset", "w4a4kv16",
            "--method", "ostquant", "--out", str(out), "--steps", "2", "--nsamples", "4",
            "--seqlen", "32", "--batch-size", "2", "--text", str(tiny_dir / "text.txt"),
            "--eval", "--eval-seqlen", "32", "--max-windows", "2", "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "s/step" in text and "perplexity" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_source"] == os.path.abspath(str(tiny_dir / "model"))
    assert cfg["online_hadamards"] == {"down_proj": True, "q_k": False}
    assert cli.main(["eval", str(out), "--text", str(tiny_dir / "text.txt"), "--seqlen", "32",
                     "--max-windows", "2", "--no-progress"]) == 0
    text2 = capsys.readouterr().out
    ppl1 = text.split("perplexity")[1].split(":")[-1].split()[0]
    ppl2 = text2.split("perplexity")[1].split(":")[-1].split()[0]
    assert ppl1 == ppl2
    assert cli.main(["eval", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", str(tiny_dir / "model"), "--method", "magic",
                     "--out", str(tmp_path / "x")]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_cli_table_with_quarot(tiny_dir, capsys):
    argv = ["table", "--model", str(tiny_dir / "model"), "--text", str(tiny_dir / "text.txt"),
            "--seqlen", "32", "--max-windows", "2", "--no-progress", "--methods", "quarot",
            "--presets", "w4a4kv4"]
    assert cli.main(argv) == 0
    assert "quarot" in capsys.readouterr().out


def test_qsur_summary(saved):
    """Per-layer QSUR of the attention/FFN inputs, before and after the transforms: rotations
    spread the tiny model's channel variances, so the mean QSUR goes up; rtn changes nothing."""
    for method in ("rtn", "quarot", "ostquant"):
        q = saved[method][2]["qsur"]
        assert len(q["layers"]) == 2
        for r in q["layers"]:
            for k in ("attn_before", "attn_after", "ffn_before", "ffn_after"):
                assert 0 < r[k] <= 1 + 1e-9
        if method == "rtn":
            assert q["mean"]["attn_after"] == q["mean"]["attn_before"]
        else:
            assert q["mean"]["attn_after"] != q["mean"]["attn_before"]


def test_layer_input_qsur_matches_direct_computation(tiny_dir):
    """The hook-based per-layer QSUR equals QSUR of the inputs captured directly."""
    from ostquant.calibrate.qsur_report import layer_input_qsur
    from ostquant.metrics.qsur import log_qsur

    model, _ = load_model(str(tiny_dir / "model"))
    data = _data()
    got = layer_input_qsur(model, data)
    seen = []
    h = model.model.layers[1].mlp.gate_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in data:
            model(input_ids=row[None])
    h.remove()
    assert got[1]["ffn_log"] == pytest.approx(log_qsur(torch.cat(seen)), rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError, match="calib_data"):
        layer_input_qsur(model, torch.zeros(0, 4, dtype=torch.long))


def test_qsur_with_too_few_tokens_is_skipped_not_fatal(tiny_dir):
    from ostquant.calibrate.qsur_report import layer_input_qsur

    model, _ = load_model(str(tiny_dir / "model"))
    rec = layer_input_qsur(model, _data()[:1, :16])  # 16 tokens < d + 1 = 65
    assert all(r["attn_rel"] is None and r["ffn_log"] is None for r in rec)


def test_directory_loads_without_its_source(tiny_dir, ids, tmp_path):
    """A saved directory is self-contained (hf_config.json + tokenizer/): it loads after the
    source model is gone, with empty (meta) weights filled from the checkpoint, and gives the
    same logits; a directory without hf_config.json (older format) loads from the source."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_dir / "model", src)
    model, tok = load_model(str(src))
    d = tmp_path / "q"
    qm, _ = quantize_model(model, tok, "quarot", "w4a4kv4", CALIB, out_dir=str(d),
                           progress=False, calib_data=_data())
    want = _logits(qm, ids)
    assert (d / "hf_config.json").is_file() and (d / "tokenizer").is_dir()
    old_format = tmp_path / "old"
    shutil.copytree(d, old_format)
    (old_format / "hf_config.json").unlink()
    assert torch.equal(_logits(load_quantized(str(old_format))[0], ids), want)
    shutil.rmtree(src)
    m2, tok2 = load_quantized(str(d))
    assert torch.equal(_logits(m2, ids), want)
    assert tok2 is not None and tok2("ab")["input_ids"] == tok("ab")["input_ids"]
    assert not any(t.is_meta for t in list(m2.parameters()) + list(m2.buffers()))
    with pytest.raises(QuantizedModelError):  # the old format needs its (deleted) source
        load_quantized(str(old_format))
    (d / "hf_config.json").write_text("{not json")
    with pytest.raises(QuantizedModelError, match="hf_config.json"):
        load_quantized(str(d))
