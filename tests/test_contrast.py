"""Routing contrast (``moekit.profile.contrast``, ``moekit contrast``): hand-computed formulas and a planted model
whose routers send one set's tokens to known experts."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from moekit.arch import MoEModelView
from moekit.cli import app
from moekit.profile import Profile, profile_model
from moekit.profile.contrast import (
    ContrastError,
    contrast_profile,
    experts_carrying,
    js_divergence_bits,
    log_odds_z,
    top_contrast_experts,
)
from moekit.tiny import build_tiny_model, byte_tokenizer

FIRST_HALF, SECOND_HALF = "abcdefghijklm", "nopqrstuvwxyz"


def planted_experts(layer: int, experts: int) -> list[int]:
    """The two experts layer ``layer``'s router sends every first-half letter to (a different pair per layer)."""
    return sorted({(3 * layer + 1) % experts, (3 * layer + 4) % experts})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Qwen3-MoE whose residual stream is each token's embedding at every layer (attention and expert outputs
    zeroed), first-half letters embedded along +u and second-half letters along -u, and whose routers give the
    planted experts of each layer a logit of 8 u.x: first-half tokens always choose them, second-half tokens never.
    Profiled on two sets of random letters from each half."""
    root = tmp_path_factory.mktemp("planted")
    model = build_tiny_model("qwen3_moe")
    tokenizer = byte_tokenizer()
    gen = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    u = torch.randn(hidden, generator=gen)
    u /= u.norm()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.copy_(0.05 * torch.randn(embedding.shape, generator=gen))
        for letters, sign in ((FIRST_HALF, 1.0), (SECOND_HALF, -1.0)):
            for token in tokenizer(letters)["input_ids"]:
                embedding[token] += sign * 3 * u
        view = MoEModelView.from_model(model)
        for layer in view.layers:
            decoder = model.model.layers[layer.index]
            decoder.self_attn.o_proj.weight.zero_()
            layer.experts.down_proj.zero_()
            router = layer.router_weight
            router.copy_(0.05 * torch.randn(router.shape, generator=gen))
            for expert in planted_experts(layer.index, layer.num_experts):
                router[expert] = 8 * u
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    for name, letters in (("first", FIRST_HALF), ("second", SECOND_HALF)):
        (root / f"{name}.txt").write_text("".join(rng.choice(letters) for _ in range(3000)))
    profile_model(root / "model", [f"first={root / 'first.txt'}", f"second={root / 'second.txt'}"],
                  root / "profile", seq_len=64, max_tokens=1024, progress=False)
    # the same texts as a safety contrast: every plan from this profile is audited against it
    profile_model(root / "model", [f"harmful={root / 'first.txt'}", f"harmless={root / 'second.txt'}"],
                  root / "safety-profile", seq_len=64, max_tokens=1024, progress=False)
    return root


def test_the_planted_experts_top_the_contrast_in_every_layer(planted) -> None:
    profile = Profile.load(planted / "profile")
    report = contrast_profile(profile, "first", "second")
    assert [row["layer"] for row in report["layers"]] == profile.fingerprint["moe_layers"]
    for row in report["layers"]:
        experts = len(row["log_odds"])
        expected = planted_experts(row["layer"], experts)
        assert sorted(e["expert"] for e in row["top_a"][:2]) == expected
        assert all(e["z"] > 10 and e["share_b"] == 0 for e in row["top_a"][:2])
        assert all(row["log_odds"][j] <= 1e-9 for j in range(experts) if j not in expected)  # 0: unused in both
        # disjoint routing: total variation 1, JS divergence 1 bit, half of the difference in the planted pair
        assert row["total_variation"] == pytest.approx(1.0)
        assert row["js_divergence_bits"] == pytest.approx(1.0)
        assert row["experts_carrying"]["50%"] == 2
    reverse = contrast_profile(profile, "second", "first")
    for row in reverse["layers"]:
        assert sorted(e["expert"] for e in row["top_b"][:2]) == planted_experts(row["layer"], len(row["log_odds"]))
    assert top_contrast_experts(profile, "first", "second", 2) == {
        layer: planted_experts(layer, 8) for layer in profile.fingerprint["moe_layers"]}


def test_log_odds_and_z_are_the_fightin_words_formula_by_hand() -> None:
    y_a, y_b, prior = [30.0, 10.0, 0.0, 60.0], [10.0, 10.0, 20.0, 60.0], 2.0
    n_a, n_b = 100.0, 100.0
    # prior per expert: 2 x max(1, 4 x pooled share); pooled shares 0.2, 0.1, 0.1, 0.6
    alphas = [2.0 * max(1.0, 4 * (y_a[j] + y_b[j]) / (n_a + n_b)) for j in range(4)]
    assert alphas == pytest.approx([2.0, 2.0, 2.0, 4.8])
    alpha_0 = sum(alphas)
    delta, z = log_odds_z(torch.tensor(y_a), torch.tensor(y_b), prior)
    for j in range(4):
        alpha = alphas[j]
        by_hand = (math.log((y_a[j] + alpha) / (n_a + alpha_0 - y_a[j] - alpha))
                   - math.log((y_b[j] + alpha) / (n_b + alpha_0 - y_b[j] - alpha)))
        assert float(delta[j]) == pytest.approx(by_hand, rel=1e-12)
        assert float(z[j]) == pytest.approx(by_hand / math.sqrt(1 / (y_a[j] + alpha) + 1 / (y_b[j] + alpha)),
                                            rel=1e-12)
    # the prior pulls a rare expert toward 0: 3 against 1 selections ranks far below 300 against 100 ...
    small, _ = log_odds_z(torch.tensor([3.0, 997.0]), torch.tensor([1.0, 999.0]), 10.0)
    large, _ = log_odds_z(torch.tensor([300.0, 700.0]), torch.tensor([100.0, 900.0]), 10.0)
    assert 0 < float(small[0]) < 0.2 < 1.2 < float(large[0])
    # ... and 0 against 24 selections of ~44,000 (the demo model's layer 3) stays near -1.2, not -6.3
    rare, _ = log_odds_z(torch.tensor([0.0, 44328.0]), torch.tensor([24.0, 44464.0]), 10.0)
    assert -1.3 < float(rare[0]) < -1.1
    with pytest.raises(ContrastError, match="--prior"):
        log_odds_z(torch.tensor(y_a), torch.tensor(y_b), 0.0)


def test_divergence_and_experts_carrying_by_hand() -> None:
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    m = [0.25, 0.5, 0.25]
    by_hand = 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1])) \
        + 0.5 * (0.5 * math.log2(0.5 / m[1]) + 0.5 * math.log2(0.5 / m[2]))
    assert js_divergence_bits(p, q) == pytest.approx(by_hand) == pytest.approx(0.5)
    assert js_divergence_bits(p, p) == 0
    difference = torch.tensor([0.4, -0.3, 0.2, -0.1])  # sum |d| = 1.0
    assert experts_carrying(difference, 0.5) == 2 and experts_carrying(difference, 0.9) == 3
    assert experts_carrying(torch.zeros(3), 0.5) == 0


def test_moekit_contrast_prints_and_writes_json_and_refuses_bad_sets(planted, tmp_path) -> None:
    runner = CliRunner()
    profile = str(planted / "profile")
    result = runner.invoke(app, ["contrast", profile, "--a", "first", "--b", "second"])
    assert result.exit_code == 0, result.output
    assert "first" in result.output and "JS" in result.output
    result = runner.invoke(app, ["contrast", profile, "--a", "first", "--b", "second", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["a"] == "first" and report["method"]["prior_per_expert"] == 10.0
    out = tmp_path / "contrast.json"
    assert runner.invoke(app, ["contrast", profile, "--a", "first", "--b", "second", "--json", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["layers"] == report["layers"]
    for argv, message in ((["--a", "first", "--b", "third"], "its sets: first, second"),
                          (["--a", "first", "--b", "first"], "two different sets"),
                          (["--a", "first", "--b", "second", "--top", "0"], "--top"),
                          (["--a", "first", "--b", "second", "--prior", "-1"], "--prior")):
        result = runner.invoke(app, ["contrast", profile, *argv, "--json", str(tmp_path / "refused.json")])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert not (tmp_path / "refused.json").exists()


def test_plans_are_audited_against_the_safety_contrast_and_protect_contrast_keeps_its_experts(planted,
                                                                                              tmp_path) -> None:
    """Frequency on the harmless set alone removes the planted experts (harmless text never reaches them): the plan
    records it, the command warns, the card says so; --protect-contrast harmful:harmless:2 keeps exactly them."""
    runner = CliRunner()
    model, profile = str(planted / "model"), str(planted / "safety-profile")
    base = ["prune", model, "--profile", profile, "--method", "frequency", "--ratio", "0.5", "--set-weights",
            "harmless=1"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "unprotected")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "unprotected" / "moekit_plan.json").read_text())
    (audit,) = plan["details"]["contrast_audits"]
    layers = Profile.load(planted / "safety-profile").fingerprint["moe_layers"]
    assert audit["per_layer"] == 2 and audit["of"] == 2 * len(layers)  # top-k of the model per layer
    assert audit["top_experts"] == {str(layer): planted_experts(layer, 8) for layer in layers}
    # the planted experts the plan drops (harmless text never reaches them: frequency 0, kept only on a tie)
    lost = [[layer, e] for layer in layers for e in planted_experts(layer, 8)
            if e not in plan["layers"][str(layer)]["kept"]]
    assert audit["not_kept"] == lost and audit["not_kept_count"] == len(lost) >= 4
    output = " ".join(result.output.split())
    assert f"removes or merges {len(lost)} of the 6 experts that 'harmful' routes to most" in output
    assert "--protect-contrast harmful:harmless:2" in output
    card = (tmp_path / "unprotected" / "README.md").read_text()
    assert f"this plan **removes or merges {len(lost)} of them**" in card
    result = runner.invoke(app, [*base, "--protect-contrast", "harmful:harmless:2", "--out",
                                 str(tmp_path / "kept")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "kept" / "moekit_plan.json").read_text())
    for layer in layers:
        assert set(planted_experts(layer, 8)) <= set(plan["layers"][str(layer)]["kept"])
    assert plan["details"]["contrast_audits"][0]["not_kept_count"] == 0
    assert plan["details"]["protections"]["contrast"] == sorted([layer, e] for layer in layers
                                                                 for e in planted_experts(layer, 8))
    assert "warning" not in result.output
    applied = runner.invoke(app, ["apply", model, str(tmp_path / "kept" / "moekit_plan.json"), "--out",
                                  str(tmp_path / "applied")])  # the recorded plan checks out when applied again
    assert applied.exit_code == 0, applied.output
    merged = runner.invoke(app, ["merge", model, "--profile", profile, "--method", "dern", "--ratio", "0.5",
                                 "--set-weights", "harmless=1", "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    merge_audit = json.loads((tmp_path / "merged" / "moekit_plan.json").read_text())["details"]["contrast_audits"]
    assert merge_audit[0]["of"] == 6 and "removes or merges" in " ".join(merged.output.split())


def test_bad_protect_contrast_is_refused_with_nothing_written(planted, tmp_path) -> None:
    runner = CliRunner()
    base = ["prune", str(planted / "model"), "--profile", str(planted / "safety-profile"), "--method", "frequency",
            "--ratio", "0.5"]
    for value, message in (("harmful:nope:2", "its sets: harmful, harmless"), ("harmful:harmless:0", "SET_A:SET_B:N"),
                           ("harmful:harmless", "SET_A:SET_B:N"), ("harmful:harmful:2", "two different sets"),
                           ("harmful:harmless:8", "every expert")):
        result = runner.invoke(app, [*base, "--protect-contrast", value, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (value, result.output)
        assert message in " ".join(result.output.split()), (value, result.output)
        assert not (tmp_path / "out").exists()


def test_the_report_shows_the_contrast_coactivation_and_sparsity(planted, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--profile", str(planted / "profile"), "--contrast", "first:second",
                                 "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Contrast of first" in text and "Co-activation of layer" in text and "CLS-L" in text
    for name in ("contrast_0.png", "contrast_0_layer.png", "coactivation.png", "sparsity.png"):
        assert (tmp_path / "report" / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # the load heatmap and the four routing figures
    # the planted experts head the table row of every layer
    for layer in Profile.load(planted / "profile").fingerprint["moe_layers"]:
        first, second = planted_experts(layer, 8)
        row = next(line for line in text.splitlines() if line.startswith(f"| {layer} | 1.000"))
        assert row.split("|")[5].strip().startswith((f"{first} (", f"{second} ("))
    # the safety contrast appears by itself
    auto = runner.invoke(app, ["report", "--profile", str(planted / "safety-profile"), "--out", str(tmp_path / "a")])
    assert auto.exit_code == 0 and "Contrast of harmful" in (tmp_path / "a" / "report.md").read_text()
    for argv, message in ((["--profile", str(planted / "profile"), "--contrast", "first:third"], "its sets"),
                          (["--profile", str(planted / "profile"), "--contrast", "first"], "SET_A:SET_B"),
                          (["--contrast", "first:second", "--plan", str(tmp_path / "report")], "give --profile")):
        bad = runner.invoke(app, ["report", *argv, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2, bad.output
        assert message in " ".join(bad.output.split())
        assert not (tmp_path / "bad").exists()


def test_mask_from_contrast_takes_the_contrasts_top_experts(planted, tmp_path) -> None:
    """moekit mask --from-contrast first:second:2 names each layer's planted pair (Qwen3-MoE has no selection bias:
    they are removed, as --allow-remove asks)."""
    result = CliRunner().invoke(app, ["mask", str(planted / "model"), "--from-contrast", "first:second:2",
                                      "--profile", str(planted / "profile"), "--allow-remove", "--out",
                                      str(tmp_path / "ablated")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "ablated" / "moekit_plan.json").read_text())
    assert {int(k): v["removed"] for k, v in plan["layers"].items()} == {
        layer: planted_experts(layer, 8) for layer in Profile.load(planted / "profile").fingerprint["moe_layers"]}
    assert "'first' routes to most more than 'second'" in plan["details"]["chosen"]


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
    """The planted model's construction with a shared middle layer: every token also carries +2v (v orthogonal to
    u), layers 0 and 2 route by u (first-half letters to their planted pair, the others never) and layer 1 sends every
    token to experts 0 and 1 along v. Profiled on 'en' (first-half letters) and 'xx' (second-half letters)."""
    root = tmp_path_factory.mktemp("bilingual")
    model = build_tiny_model("qwen3_moe")
    tokenizer = byte_tokenizer()
    gen = torch.Generator().manual_seed(1)
    hidden = model.config.hidden_size
    u, v = torch.linalg.qr(torch.randn(hidden, 2, generator=gen)).Q.T  # orthonormal
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.copy_(0.05 * torch.randn(embedding.shape, generator=gen) + 2 * v)
        for letters, sign in ((FIRST_HALF, 1.0), (SECOND_HALF, -1.0)):
            for token in tokenizer(letters)["input_ids"]:
                embedding[token] += sign * 3 * u
        for layer in MoEModelView.from_model(model).layers:
            model.model.layers[layer.index].self_attn.o_proj.weight.zero_()
            layer.experts.down_proj.zero_()
            router = layer.router_weight
            router.copy_(0.05 * torch.randn(router.shape, generator=gen))
            shared_layer = layer.index == 1
            for expert in ([0, 1] if shared_layer else planted_experts(layer.index, layer.num_experts)):
                router[expert] = 8 * (v if shared_layer else u)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(1)
    for name, letters in (("en", FIRST_HALF), ("xx", SECOND_HALF)):
        (root / f"{name}.txt").write_text("".join(rng.choice(letters) for _ in range(3000)))
    profile_model(root / "model", [f"en={root / 'en.txt'}", f"xx={root / 'xx.txt'}"], root / "profile", seq_len=64,
                  max_tokens=1024, progress=False)
    return root


def test_routing_similarity_finds_the_shared_middle_layer(bilingual, tmp_path) -> None:
    from moekit.profile.contrast import routing_similarity

    profile = Profile.load(bilingual / "profile")
    result = routing_similarity(profile, "en")
    assert result["layers"] == [0, 1, 2] and list(result["similarity"]) == ["xx"]
    low, shared, high = result["similarity"]["xx"]
    assert shared == pytest.approx(1.0, abs=1e-9)  # every token routes to experts 0 and 1
    assert low < 0.2 and high < 0.2  # language-specific layers: disjoint planted pairs
    runner = CliRunner()
    analysed = runner.invoke(app, ["analyze", str(bilingual / "profile"), "--similarity-to", "en", "--json", "-"])
    assert analysed.exit_code == 0, analysed.output
    assert json.loads(analysed.output)["similarity"]["similarity"]["xx"] == result["similarity"]["xx"]
    report = runner.invoke(app, ["report", "--profile", str(bilingual / "profile"), "--out", str(tmp_path / "r")])
    assert report.exit_code == 0, report.output  # en is in the profile: the similarity plot comes by itself
    assert (tmp_path / "r" / "figures" / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert "Routing similarity of every set to en" in (tmp_path / "r" / "report.md").read_text()
    for argv, message in ((["analyze", str(bilingual / "profile"), "--similarity-to", "fr"], "its sets: en, xx"),
                          (["report", "--similarity-to", "en", "--out", str(tmp_path / "bad")], "give --profile")):
        bad = runner.invoke(app, argv)
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
    assert not (tmp_path / "bad").exists()


def test_steering_biases_promote_the_references_experts_where_asked(bilingual) -> None:
    """steering_biases(en, xx) boosts the pair en routes to more than xx (layer 0: the planted pair), in the middle
    third by default; through routing_override the 'xx' text then routes to en's pair in layer 0."""
    from transformers import AutoModelForCausalLM

    from moekit.data import CalibrationSet
    from moekit.edit.mask import routing_override
    from moekit.profile import collect_profile
    from moekit.profile.contrast import ContrastError, steering_biases

    profile = Profile.load(bilingual / "profile")
    assert list(steering_biases(profile, "en", "xx", 1.0, 2)) == [1]  # the middle third of layers 0, 1, 2
    biases = steering_biases(profile, "en", "xx", 200.0, 2, layers=[0])
    want = torch.zeros(8)
    want[planted_experts(0, 8)] = 200.0
    assert list(biases) == [0] and torch.equal(biases[0], want)
    with pytest.raises(ContrastError, match="not MoE layers"):
        steering_biases(profile, "en", "xx", 1.0, 2, layers=[7])
    model = AutoModelForCausalLM.from_pretrained(bilingual / "model").eval()
    ids = torch.tensor([byte_tokenizer()(SECOND_HALF * 4)["input_ids"][:64]])
    xx = [CalibrationSet("xx", ids, torch.ones_like(ids))]
    plain = collect_profile(model, xx, batch_size=1, progress=False)
    with routing_override(MoEModelView.from_model(model), biases):
        steered = collect_profile(model, xx, batch_size=1, progress=False)
    planted = planted_experts(0, 8)
    share = lambda p: float(p.stat(0, "count", "xx")[planted].sum() / p.stat(0, "count", "xx").sum())  # noqa: E731
    assert share(plain) < 0.1 and share(steered) == pytest.approx(1.0)


def test_similarity_sets_pick_sets_by_pattern(bilingual, tmp_path) -> None:
    """--similarity-sets narrows the compared sets by shell pattern; a pattern matching no set is refused, listing
    the sets, and nothing is written."""
    from moekit.profile.contrast import ContrastError, matching_sets

    profile = Profile.load(bilingual / "profile")
    assert matching_sets(profile, ["x*"]) == ["xx"] and matching_sets(profile, ["*"]) == ["en", "xx"]
    with pytest.raises(ContrastError, match=r"no calibration set matches 'zz\*'.*en, xx"):
        matching_sets(profile, ["zz*"])
    runner = CliRunner()
    analysed = runner.invoke(app, ["analyze", str(bilingual / "profile"), "--similarity-to", "en",
                                   "--similarity-sets", "x*", "--json", "-"])
    assert analysed.exit_code == 0, analysed.output
    assert list(json.loads(analysed.output)["similarity"]["similarity"]) == ["xx"]
    lonely = runner.invoke(app, ["analyze", str(bilingual / "profile"), "--similarity-sets", "x*"])
    assert lonely.exit_code == 2 and "give that too" in lonely.output
    bad = runner.invoke(app, ["report", "--profile", str(bilingual / "profile"), "--similarity-to", "en",
                              "--similarity-sets", "zz*", "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "no calibration set matches" in bad.output
    assert not (tmp_path / "r").exists()
