"""Rank 0 exports only coefficients every rank agrees on (core.distributed.check_ranks_agree)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from axolotl_cat_plugin.core import CatError, check_ranks_agree
from axolotl_cat_plugin.core.state import CatState, put_state

pytestmark = pytest.mark.core_distributed


class Holder(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.layer = nn.Module()
        coefficients = nn.Parameter(torch.tensor(values))
        put_state(self.layer, CatState("layer", ("a", "b"), "free", coefficients=coefficients))
        self.other = nn.Parameter(torch.zeros(2))  # not a coefficient: never compared


def _rank(rank: int, init_file: str, results, drift: float) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        holder = Holder([1.0, 0.5 + (drift if rank == 1 else 0.0)])
        holder.other.data += rank  # differences outside the coefficients do not matter
        try:
            results[rank] = ("agree", check_ranks_agree(holder))
        except CatError as error:
            results[rank] = ("refused", str(error))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, drift: float) -> dict:
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), results, drift), nprocs=2, join=True)
    return dict(results)


def test_one_process_has_nothing_to_compare():
    assert check_ranks_agree(Holder([1.0])) is None


def test_identical_ranks_pass(tmp_path):
    results = run_two_ranks(tmp_path, drift=0.0)
    assert results == {0: ("agree", 0.0), 1: ("agree", 0.0)}


def test_a_rank_that_drifted_stops_the_export_on_every_rank(tmp_path):
    results = run_two_ranks(tmp_path, drift=1e-3)
    for rank in (0, 1):
        outcome, message = results[rank]
        assert outcome == "refused", f"rank {rank} went on to export"
        assert "differ between the 2 ranks" in message and "not exporting" in message
