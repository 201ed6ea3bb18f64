"""STUN's first stage (``moekit.plan.stun``): co-activation distance, greedy clustering, representatives."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import profiled_tiny_model

from moekit.edit import PlanError
from moekit.plan.stun import coactivation_distance, greedy_clusters, representative


def test_distance_is_minus_coactivation_over_its_off_diagonal_mean() -> None:
    c = torch.tensor([[9.0, 4.0, 0.0], [4.0, 7.0, 2.0], [0.0, 2.0, 5.0]])
    d = coactivation_distance(c)
    mean = (4 + 0 + 4 + 2 + 0 + 2) / 6  # off-diagonal entries
    assert d[0, 1] == pytest.approx(-4 / mean) and d[1, 2] == pytest.approx(-2 / mean) and d[0, 2] == 0
    assert torch.isinf(d.diagonal()).all()


def test_greedy_clustering_joins_the_closest_pairs_first() -> None:
    # co-selected most: (0, 3), then (1, 2), then (3, 4)
    c = torch.zeros(5, 5)
    for (i, j), n in {(0, 3): 10, (1, 2): 8, (3, 4): 6, (0, 1): 1}.items():
        c[i, j] = c[j, i] = n
    d = coactivation_distance(c)
    assert greedy_clusters(d, 4) == [[0, 3], [1], [2], [4]]
    assert greedy_clusters(d, 3) == [[0, 3], [1, 2], [4]]
    assert greedy_clusters(d, 2) == [[0, 3, 4], [1, 2]]
    # two protected experts never end in one cluster: (0, 3) cannot join, so (1, 2) and (3, 4) go first
    assert greedy_clusters(d, 3, protected={0, 3}) == [[0], [1, 2], [3, 4]]
    with pytest.raises(PlanError, match="protected"):
        greedy_clusters(d, 1, protected={0, 3})


def test_representative_is_the_member_closest_to_the_cluster_mean_or_the_protected_one() -> None:
    flat = {0: torch.tensor([0.0, 0.0]), 1: torch.tensor([1.0, 0.0]), 2: torch.tensor([5.0, 0.0])}
    assert representative([0, 1, 2], flat, set()) == 1  # mean (2, 0): distances 2, 1, 3
    assert representative([0, 1, 2], flat, {2}) == 2
    assert representative([7], {}, set()) == 7


@pytest.fixture(scope="module")
def stun_profile(tmp_path_factory):
    return profiled_tiny_model(tmp_path_factory.mktemp("stun"), "qwen3_moe", "neuron_stats",
                               " ".join(f"word{i % 97} and the {i % 13} line {i}" for i in range(3000)), 2048)


def test_moekit_prune_method_stun_keeps_one_expert_per_cluster(stun_profile, tmp_path) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app
    from moekit.plan.stun import combined_coactivation
    from moekit.profile import Profile

    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(stun_profile / "model"), "--profile", str(stun_profile / "profile"),
                                 "--method", "stun", "--ratio", "0.25", "--out", str(tmp_path / "stun")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "stun" / "config.json").read_text())["num_experts"] == 6
    plan = json.loads((tmp_path / "stun" / "moekit_plan.json").read_text())
    assert plan["method"] == "stun"
    profile = Profile.load(stun_profile / "profile")
    for key, layer in plan["layers"].items():
        clusters = {tuple(e["cluster"]) for e in layer["experts"]}
        assert len(clusters) == 6 and sorted(e for c in clusters for e in c) == list(range(8))
        assert all(sum(e in layer["kept"] for e in c) == 1 for c in clusters)  # one representative per cluster
        # the first pair joined is the most co-selected pair of the layer
        c = combined_coactivation(profile, int(key), None)
        c.fill_diagonal_(-1)
        i, j = divmod(int(c.argmax()), 8)
        assert any(i in cl and j in cl for cl in clusters)
