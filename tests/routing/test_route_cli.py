"""`meshserve route` argument parsing and output (no server)."""

from __future__ import annotations

import pytest

from meshserve.client.commands import pairs as _pairs
from meshserve.client.format import format_status
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb


def test_pairs():
    assert _pairs("1=90, 2=10", "--split") == {"1": 90.0, "2": 10.0}
    assert _pairs("", "--shadow") == {}
    with pytest.raises(SystemExit, match="expected VERSION=NUMBER, got '1:90'"):
        _pairs("1:90", "--split")
    with pytest.raises(SystemExit, match="got '2=ten'"):
        _pairs("2=ten", "--split")


def test_format_status():
    status = rpb.PolicyStatus(has_policy=True, policy=rpb.RoutingPolicy(
        model="digits", split=[rpb.VersionWeight(version="2", weight=95),
                               rpb.VersionWeight(version="1", weight=5)],
        shadow=[rpb.VersionWeight(version="3", weight=20)],
        fallback=[rpb.RouteTarget(model="digits_small")], source="runtime", revision=4),
        stats=[rpb.RouteStats(model="digits", version="3", route="shadow", requests=10,
                              agree=9, disagree=1)])
    text = format_status("digits", status)
    assert "digits: runtime policy, revision 4" in text
    assert "split     2=95% 1=5%" in text and "shadow    3=20%" in text
    assert "fallback  digits_small" in text
    assert "digits:3" in text and "agree=9 disagree=1" in text
    assert "no routing policy" in format_status("x", rpb.PolicyStatus())
