"""Expert merging: the arithmetic against hand computations, alignment, the plan reader, checkpoints with fewer
experts on every family, byte-exact pruning as the singleton case, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALL_FAMILIES, capture_transformers_log, profiled_tiny_model, random_ids
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moekit.arch import MoEModelView
from moekit.arch.experts import ExpertWeights
from moekit.edit import PlanError, prune_to_checkpoint
from moekit.merge import Group, Member, merge_to_checkpoint
from moekit.merge.card import merge_plan_record
from moekit.merge.combine import align_to, merge_group
from moekit.merge.methods import kmeans
from moekit.model_io import load_structure
from moekit.pipeline import PlanInputs, apply_plan, make_plan, read_inputs
from moekit.plan import PlanRequest
from moekit.plan.check import checked_plan
from moekit.profile.collect import profile_model
from moekit.profile.profile_file import Profile, ProfileError
from moekit.summary import summarize

MERGE_METHODS = ("hc_smoe", "m_smoe", "sub_moe", "dern")


def _expert(seed: int, size: int = 6, hidden: int = 4, bias: bool = False) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return ExpertWeights(r(size, hidden), r(size, hidden), r(hidden, size),
                         r(size) if bias else None, r(size) if bias else None, r(hidden) if bias else None)


def _swiglu(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T) @ w.down.T


def test_identical_experts_merge_into_exactly_that_expert() -> None:
    w = _expert(0, bias=True)
    group = Group(0, (Member(0, 0.3), Member(1, 0.7)))
    merged = merge_group([w, w], group)
    for field in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        assert torch.equal(getattr(merged, field), getattr(w, field)), field


def test_merge_is_the_aligned_frequency_weighted_average_by_hand() -> None:
    a, b = _expert(1, bias=True), _expert(2, bias=True)
    perm = [3, 0, 5, 1, 2, 4]  # b's neuron n goes into output neuron perm[n]
    merged = merge_group([a, b], Group(0, (Member(0, 0.25), Member(1, 0.75, tuple(perm)))))
    for m in range(6):
        n = perm.index(m)
        for field, get in (("gate", lambda w, i: w.gate[i]), ("up", lambda w, i: w.up[i]),
                           ("down", lambda w, i: w.down[:, i]), ("gate_bias", lambda w, i: w.gate_bias[i]),
                           ("up_bias", lambda w, i: w.up_bias[i])):
            expected = 0.25 * get(a, m).double() + 0.75 * get(b, n).double()
            assert torch.allclose(get(merged, m).double(), expected, atol=1e-6), (field, m)
    assert torch.allclose(merged.down_bias.double(), 0.25 * a.down_bias.double() + 0.75 * b.down_bias.double(),
                          atol=1e-6)


def test_partial_neuron_maps_average_only_what_each_output_neuron_receives() -> None:
    a, b = _expert(3), _expert(4)
    # b sends neuron 2 into output neuron 0 and neuron 5 into output neuron 4; its other neurons are left out
    merged = merge_group([a, b], Group(0, (Member(0, 0.6), Member(1, 0.4, (-1, -1, 0, -1, -1, 4)))))
    assert torch.allclose(merged.up[0].double(), 0.6 * a.up[0].double() + 0.4 * b.up[2].double(), atol=1e-6)
    assert torch.allclose(merged.down[:, 4].double(), 0.6 * a.down[:, 4].double() + 0.4 * b.down[:, 5].double(),
                          atol=1e-6)
    for m in (1, 2, 3, 5):  # only a's neuron: renormalised to a itself
        assert torch.allclose(merged.gate[m], a.gate[m], atol=1e-6)


def test_alignment_recovers_a_known_permutation_and_the_permuted_expert_is_the_same_function() -> None:
    a = _expert(5, size=32, hidden=8)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(7))
    b = ExpertWeights(a.gate[perm], a.up[perm], a.down[:, perm])  # b's neuron n is a's neuron perm[n]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(_swiglu(a, x), _swiglu(b, x), atol=1e-5)
    assert align_to(a, b) == perm.tolist()
    merged = merge_group([a, b], Group(0, (Member(0, 0.5), Member(1, 0.5, tuple(align_to(a, b))))))
    assert torch.allclose(merged.up, a.up, atol=1e-6) and torch.allclose(merged.down, a.down, atol=1e-6)


def test_joint_svd_at_full_rank_is_the_average_and_below_it_the_projection_by_hand() -> None:
    a, b = _expert(9, size=6, hidden=4), _expert(10, size=6, hidden=4)
    plain = merge_group([a, b], Group(0, (Member(0, 0.3), Member(1, 0.7))))
    full = merge_group([a, b], Group(0, (Member(0, 0.3), Member(1, 0.7)), {"method": "joint_svd", "rank": 6}))
    assert torch.allclose(full.up, plain.up, atol=1e-5) and torch.allclose(full.down, plain.down, atol=1e-5)
    low = merge_group([a, b], Group(0, (Member(0, 0.3), Member(1, 0.7)), {"method": "joint_svd", "rank": 2}))
    # by hand, Sub-MoE's formulation: [W_a, W_b] = U S [V_a; V_b]; W = U_r S_r (0.3 V_a + 0.7 V_b)_r
    joint = torch.cat([a.up.double(), b.up.double()], dim=1)
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    va, vb = vh[:, :4], vh[:, 4:]
    expected = u[:, :2] @ torch.diag(s[:2]) @ (0.3 * va + 0.7 * vb)[:2]
    assert torch.allclose(low.up.double(), expected, atol=1e-5)
    assert not torch.allclose(low.up, plain.up, atol=1e-3)


def test_kmeans_makes_exactly_k_non_empty_clusters() -> None:
    points = torch.cat([torch.zeros(5, 3), torch.ones(5, 3) * 10, torch.tensor([[10.0, 10, 10]])])
    for k in (1, 2, 3, 5, 11):
        labels = kmeans(points, k, seed=0)
        assert sorted(set(labels)) == list(range(k))
    assert len(set(kmeans(points, 2, seed=0)[:5])) == 1


def _groups(view: MoEModelView, merged: tuple[int, ...] = (0, 1), perm: tuple[int, ...] | None = None):
    return {layer.index: [Group(merged[0], tuple(Member(e, 1 / len(merged), perm if i and perm else None)
                                                 for i, e in enumerate(merged)))]
            + [Group(e, (Member(e, 1.0),)) for e in range(view.num_experts) if e not in merged]
            for layer in view.layers}


def _load(path):
    with capture_transformers_log() as log:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info, log.getvalue()


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_merged_checkpoint_has_fewer_experts_on_disk_and_holds_the_hand_merge(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(original)
    size = view.layers[0].intermediate_size
    perm = tuple(reversed(range(size)))
    groups = _groups(view, (0, 1, 2), perm)
    plan = merge_plan_record(str(source), summarize(view), groups, "hand")
    result = merge_to_checkpoint(source, groups, plan, tmp_path / "merged")
    model, info, log = _load(result.out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log == "", f"transformers warned on reload: {log}"
    merged_view = MoEModelView.from_model(model)
    assert merged_view.num_experts == view.num_experts - 2
    assert result.after.routed_expert_parameters * view.num_experts == \
        result.before.routed_expert_parameters * (view.num_experts - 2)
    for layer, new in zip(view.layers, merged_view.layers, strict=True):
        w = [layer.layout.expert_weights(layer.experts, e) for e in (0, 1, 2)]
        got = new.layout.expert_weights(new.experts, 0)
        flip = list(reversed(range(size)))
        expected_up = (w[0].up.double() + w[1].up.double()[flip] + w[2].up.double()[flip]) / 3
        assert torch.allclose(got.up.double(), expected_up, atol=1e-5), layer.index
        kept = new.layout.expert_weights(new.experts, 1)  # expert 3 of the source, copied
        assert torch.equal(kept.down, layer.layout.expert_weights(layer.experts, 3).down)
        assert torch.equal(new.router_weight[1:], layer.router_weight[3:])  # router rows of the kept experts
        assert torch.equal(new.router_weight[0], layer.router_weight[0])  # the group's router expert's row
    with torch.no_grad():
        model(input_ids=random_ids())


def test_routed_expert_bytes_on_disk_are_the_kept_fraction(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_moe")
    view = MoEModelView.from_model(load_structure(source))
    groups = _groups(view, (0, 1, 2, 3))
    merged = merge_to_checkpoint(source, groups, merge_plan_record(str(source), summarize(view), groups, "hand"),
                                 tmp_path / "merged").out

    def expert_bytes(path):
        return sum(t.numel() * t.element_size() for name, t in _tensors(path).items() if ".experts." in name)

    assert expert_bytes(merged) * view.num_experts == expert_bytes(source) * (view.num_experts - 3)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx", "llama4_text"])
def test_singleton_groups_write_the_pruned_checkpoint_byte_for_byte(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    view = MoEModelView.from_model(load_structure(source))
    keep = {layer.index: [0, 2, 3, 5, 6] for layer in view.layers}
    groups = {i: [Group(e, (Member(e, 1.0),)) for e in ids] for i, ids in keep.items()}
    merged = merge_to_checkpoint(source, groups, merge_plan_record(str(source), summarize(view), groups, "hand"),
                                 tmp_path / "merged").out
    pruned = prune_to_checkpoint(source, keep, tmp_path / "pruned").out
    files = sorted(p.name for p in pruned.glob("*.safetensors"))
    assert files == sorted(p.name for p in merged.glob("*.safetensors"))
    for name in files:
        assert (merged / name).read_bytes() == (pruned / name).read_bytes()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx"])
def test_streamed_merge_equals_the_in_memory_merge(family, tiny_checkpoint, tmp_path, monkeypatch):
    source = tiny_checkpoint(family)
    view = MoEModelView.from_model(load_structure(source))
    groups = _groups(view, (1, 4), tuple(reversed(range(view.layers[0].intermediate_size))))
    plan = merge_plan_record(str(source), summarize(view), groups, "hand")
    streamed = _tensors(merge_to_checkpoint(source, groups, plan, tmp_path / "streamed").out)
    monkeypatch.setattr("moekit.edit.stream.needs_cast", lambda tensors, dtype: True)  # force the in-memory path
    in_memory = _tensors(merge_to_checkpoint(source, groups, plan, tmp_path / "memory").out)
    assert sorted(streamed) == sorted(in_memory)
    for name in streamed:
        assert torch.equal(streamed[name], in_memory[name]), name
    assert not list((tmp_path / "streamed").glob(".moekit-merged*"))  # the scratch file is gone


@pytest.fixture(scope="module")
def merge_profile(tmp_path_factory):
    """A tiny Mixtral, its profile with merge statistics, and one without."""
    return profiled_tiny_model(tmp_path_factory.mktemp("merge-profile"), "mixtral", "merge_stats",
                               " ".join(f"token{i % 89} said the {i % 7} line {i}" for i in range(4000)), 4096)


def test_merge_statistics_leave_every_other_statistic_unchanged(merge_profile) -> None:
    """Pruning criteria read the same statistics from a profile with --merge-stats as from one without."""
    with_merge, plain = Profile.load(merge_profile / "profile"), Profile.load(merge_profile / "plain")
    extra = {"router_logit_gram", "expert_output_sum"}
    assert with_merge.layers.keys() == plain.layers.keys()
    for layer, stats in plain.layers.items():
        assert set(with_merge.layers[layer]) == set(stats) | extra
        for name, tensor in stats.items():
            assert torch.equal(with_merge.layers[layer][name], tensor), (layer, name)


def test_merge_statistics_equal_a_direct_computation(merge_profile) -> None:
    model = AutoModelForCausalLM.from_pretrained(merge_profile / "model").eval()
    view = MoEModelView.from_model(model)
    profile = Profile.load(merge_profile / "profile")
    from moekit.data import DataSpec, load_calibration_set, load_tokenizer

    cset = load_calibration_set(DataSpec.parse(f"prose={merge_profile / 'text.txt'}"),
                                load_tokenizer(merge_profile / "model"), 64, 4096, 0)
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.experts.register_forward_pre_hook(
        lambda m, args, i=layer.index: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in view.layers]
    with torch.no_grad():
        for first in range(0, cset.num_sequences, 8):
            model(input_ids=cset.input_ids[first:first + 8])
    for hook in hooks:
        hook.remove()
    for layer in view.layers:
        x = torch.cat(inputs[layer.index])[cset.attention_mask.reshape(-1).bool()]
        logits = (x @ layer.router_weight.T).double()
        assert torch.allclose(profile.layers[layer.index]["router_logit_gram"][0], logits.T @ logits, rtol=1e-5)
        for e in range(layer.num_experts):
            w = layer.layout.expert_weights(layer.experts, e)
            expected = _swiglu(w, x).double().sum(0)
            got = profile.layers[layer.index]["expert_output_sum"][0, e]
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (layer.index, e)


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_every_method_plans_reloadable_checkpoints_that_apply_byte_for_byte(method, merge_profile, tmp_path):
    source = merge_profile / "model"
    extra = {"threshold": 0.0} if method == "dern" else {"svd_rank": 8} if method == "sub_moe" else {}
    request = PlanRequest(method=method, ratio=0.5, extra=extra)
    plan = make_plan(source, request, read_inputs(merge_profile / "profile"), kind="merge")
    assert plan["format"] == "moekit.expert_merge_plan/1" and plan["num_experts"] == {"before": 8, "after": 4}
    first = apply_plan(source, plan, tmp_path / "a").out
    model, info, _ = _load(first)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert MoEModelView.from_model(model).num_experts == 4
    saved = json.loads((first / "moekit_plan.json").read_text())
    again = apply_plan(source, saved, tmp_path / "b").out
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    for entry in plan["layers"].values():
        decisions = [e["decision"] for e in entry["experts"]]
        assert decisions.count("keep") == 4 and all(e["reason"] for e in entry["experts"])
        if method != "dern":  # every expert merged or kept (dern discards dissimilar neurons, not experts)
            assert "drop" not in decisions or any("never routed" in e["reason"] for e in entry["experts"])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_method_on_every_family_reloads_with_fewer_experts(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 53} of line {i}" for i in range(1500)))
    profile_model(source, [f"a={text}"], tmp_path / "profile", seq_len=32, max_tokens=1024, merge_stats=True,
                  progress=False)
    inputs = read_inputs(tmp_path / "profile")
    for method in MERGE_METHODS:
        extra = {"threshold": 0.0} if method == "dern" else {}
        plan = make_plan(source, PlanRequest(method, ratio=0.25, protect_super=False, extra=extra), inputs,
                         kind="merge")
        out = apply_plan(source, plan, tmp_path / method).out
        model, info, _ = _load(out)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], method
        assert MoEModelView.from_model(model).num_experts == 6, method
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=random_ids()).logits).all(), method


def test_m_smoe_dominants_are_the_most_frequent_and_members_join_the_most_similar(merge_profile) -> None:
    profile = Profile.load(merge_profile / "profile")
    plan = make_plan(merge_profile / "model", PlanRequest("m_smoe", keep=3, protect_super=False),
                     read_inputs(merge_profile / "profile"), kind="merge")
    for key, entry in plan["layers"].items():
        count = profile.layers[int(key)]["count"][0]
        gram = profile.layers[int(key)]["router_logit_gram"][0]
        top = sorted(range(8), key=lambda e: (-float(count[e]), e))[:3]
        assert sorted(entry["kept"]) == sorted(top)
        norm = gram.diagonal().sqrt()
        for group in entry["groups"]:
            for member in group["members"]:
                e = member["expert"]
                best = max(top, key=lambda d: float(gram[e, d] / (norm[e] * norm[d])))
                assert best == group["router"], (key, e)
                if e != group["router"]:
                    assert sorted(member["neurons"]) == list(range(96))  # a permutation


def test_hc_smoe_clusters_are_average_linkage_by_a_direct_agglomeration(merge_profile) -> None:
    profile = Profile.load(merge_profile / "profile")
    plan = make_plan(merge_profile / "model", PlanRequest("hc_smoe", keep=3, protect_super=False),
                     read_inputs(merge_profile / "profile"), kind="merge")
    for key, entry in plan["layers"].items():
        points = profile.layers[int(key)]["expert_output_sum"][0]
        clusters = [[e] for e in range(8)]
        while len(clusters) > 3:  # merge the two clusters of smallest mean pairwise distance
            pairs = [(float(torch.cdist(points[a], points[b]).mean()), i, j)
                     for i, a in enumerate(clusters) for j, b in enumerate(clusters) if i < j]
            _, i, j = min(pairs)
            clusters[i] = clusters[i] + clusters.pop(j)
        ours = sorted(sorted(m["expert"] for m in g["members"]) for g in entry["groups"])
        assert ours == sorted(sorted(c) for c in clusters)


def test_dern_moves_a_copied_experts_neurons_into_the_original(tiny_checkpoint, tmp_path):
    from moekit.tiny import build_tiny_model

    model = build_tiny_model("mixtral")
    view = MoEModelView.from_model(model)
    with torch.no_grad():
        for layer in view.layers:  # expert 7 = expert 0 exactly
            w0, w7 = (layer.layout.expert_weights(layer.experts, e) for e in (0, 7))
            for field in ("gate", "up", "down"):
                getattr(w7, field).copy_(getattr(w0, field))
    model.save_pretrained(tmp_path / "model")
    from moekit.tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 31} {i}" for i in range(2000)))
    profile_model(tmp_path / "model", [f"a={text}"], tmp_path / "profile", seq_len=32, max_tokens=1024,
                  progress=False)
    profile = Profile.load(tmp_path / "profile")
    request = PlanRequest("dern", keep=7, protect_super=False, extra={"threshold": 0.999})
    # make expert 7 the least important in every layer so that it is the one dropped
    for stats in profile.layers.values():
        stats["gate_sum"][0, 7] = 0.0
    plan = make_plan(tmp_path / "model", request, PlanInputs(profile=profile), kind="merge")
    for entry in plan["layers"].values():
        assert 7 in entry["removed"]
        home = [g for g in entry["groups"] if any(m["expert"] == 7 for m in g["members"])]
        assert len(home) == 1 and home[0]["router"] == 0
        sent = next(m for m in home[0]["members"] if m["expert"] == 7)["neurons"]
        assert sent == list(range(96))  # every neuron into its own copy
    out = apply_plan(tmp_path / "model", plan, tmp_path / "merged").out
    merged = MoEModelView.from_model(_load(out)[0])
    for layer, new in zip(view.layers, merged.layers, strict=True):
        assert torch.allclose(new.layout.expert_weights(new.experts, 0).up,
                              layer.layout.expert_weights(layer.experts, 0).up, atol=1e-6)


def test_bad_merge_requests_are_refused_before_anything_is_written(merge_profile, tmp_path):
    source = merge_profile / "model"
    inputs = read_inputs(merge_profile / "profile")
    with pytest.raises(Exception, match=r"valid:.*hc_smoe"):
        make_plan(source, PlanRequest("hc_smoe_typo", ratio=0.5), inputs, kind="merge")
    with pytest.raises(PlanError, match="strictly between 0 and 1"):
        make_plan(source, PlanRequest("hc_smoe", ratio=1.5), inputs, kind="merge")
    with pytest.raises(ProfileError, match="--merge-stats"):
        make_plan(source, PlanRequest("m_smoe", ratio=0.5), read_inputs(merge_profile / "plain"), kind="merge")
    with pytest.raises(PlanError, match="pruning method"):
        make_plan(source, PlanRequest("reap", ratio=0.5), inputs, kind="merge")
    with pytest.raises(PlanError, match="is a cosine"):
        make_plan(source, PlanRequest("dern", ratio=0.5, extra={"threshold": 2.0}), inputs, kind="merge")
    with pytest.raises(PlanError, match="positive integer"):
        make_plan(source, PlanRequest("sub_moe", ratio=0.5, extra={"svd_rank": 0}), inputs, kind="merge")
    with pytest.raises(PlanError, match="merging method"):
        make_plan(source, PlanRequest("hc_smoe", ratio=0.5), inputs)  # moekit prune's kind
    plan = make_plan(source, PlanRequest("hc_smoe", ratio=0.5), inputs, kind="merge")
    broken = json.loads(json.dumps(plan))
    broken["layers"]["0"]["groups"][0]["members"][0]["weight"] += 0.5
    with pytest.raises(PlanError, match="sum to"):
        apply_plan(source, broken, tmp_path / "out")
    broken = json.loads(json.dumps(plan))
    groups = broken["layers"]["0"]["groups"]
    groups[1]["members"].append(dict(groups[0]["members"][0]))  # one expert in two groups
    for member in groups[1]["members"]:
        member["weight"] = 1 / len(groups[1]["members"])
    groups[1]["members"][-1]["weight"] = 1 - sum(m["weight"] for m in groups[1]["members"][:-1])
    with pytest.raises(PlanError, match="in 2 groups"):
        apply_plan(source, broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_merge_plan_is_never_read_as_the_pruning_of_its_kept_experts(merge_profile, tmp_path):
    source = merge_profile / "model"
    plan = make_plan(source, PlanRequest("hc_smoe", ratio=0.5), read_inputs(merge_profile / "profile"),
                     kind="merge")
    checked = checked_plan(plan, MoEModelView.from_model(load_structure(source)))
    merged = _tensors(apply_plan(source, checked, tmp_path / "merged").out)
    keep = {int(k): v["kept"] for k, v in plan["layers"].items()}
    pruned = _tensors(prune_to_checkpoint(source, keep, tmp_path / "pruned").out)
    assert sorted(merged) == sorted(pruned)
    differ = [n for n in merged if not torch.equal(merged[n], pruned[n])]
    multi = any(len(g["members"]) > 1 for e in plan["layers"].values() for g in e["groups"])
    assert multi and differ and all(".experts." in n for n in differ)


def test_group_limited_routing_merges_only_within_a_routing_group(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("deepseek_v3", n_group=2, topk_group=1)
    view = MoEModelView.from_model(load_structure(source))
    # experts 0 and 5 lie in routing groups 0 and 1 (blocks of 4); 3 output experts per routing group
    groups = {layer.index: [Group(0, (Member(0, 0.5), Member(5, 0.5))), Group(1, (Member(1, 0.5), Member(2, 0.5)))]
              + [Group(e, (Member(e, 1.0),)) for e in (3, 4, 6, 7)] for layer in view.layers}
    plan = merge_plan_record(str(source), summarize(view), groups, "hand")
    with pytest.raises(PlanError, match="routing group"):
        merge_to_checkpoint(source, groups, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_expert_never_routed_to_is_left_out_of_its_cluster_and_says_why(merge_profile) -> None:
    profile = Profile.load(merge_profile / "profile")
    for stats in profile.layers.values():
        stats["count"][0, 7] = 0.0
    plan = make_plan(merge_profile / "model", PlanRequest("hc_smoe", keep=2, protect_super=False),
                     PlanInputs(profile=profile), kind="merge")
    for entry in plan["layers"].values():
        assert all(m["expert"] != 7 for g in entry["groups"] for m in g["members"])
        record = entry["experts"][7]
        assert record["decision"] == "drop" and "never routed to" in record["reason"], record
