"""The gateway's route table: atomic compare-and-set switches, canary share, per-target in-flight counts."""

from __future__ import annotations

import pytest

from serving.catalog import Catalog, Name, Version
from serving.routes import RouteConflict, RouteTable


def test_switch_returns_previous_and_compare_and_set_refuses_a_stale_expectation() -> None:
    routes = RouteTable({"champion": "m-v1"})
    assert routes.switch("champion", "m-v2", expect="m-v1") == "m-v1"
    with pytest.raises(RouteConflict, match="points at 'm-v2', not 'm-v1'"):
        routes.switch("champion", "m-v3", expect="m-v1")
    assert routes.resolve("champion") == "m-v2" and routes.switches == 1
    assert routes.switch("challenger", "m-v3") is None and routes.resolve("challenger") == "m-v3"
    assert routes.resolve("unknown") is None


def test_a_request_keeps_the_target_it_resolved_while_the_alias_moves() -> None:
    routes = RouteTable({"champion": "m-v1"})
    target = routes.resolve("champion")
    routes.enter(target)
    routes.switch("champion", "m-v2")
    assert routes.snapshot()["in_flight"] == {"m-v1": 1}
    assert routes.resolve("champion") == "m-v2"
    routes.leave(target)
    assert routes.snapshot()["in_flight"] == {}


def test_canary_sends_about_its_share_of_champion_traffic_to_the_challenger() -> None:
    routes = RouteTable({"champion": "m-v1", "challenger": "m-v2"}, canary_share=0.2, seed=7)
    hits = sum(routes.resolve("champion") == "m-v2" for _ in range(5000))
    assert 900 < hits < 1100  # 20 % of 5,000, ± 5 standard deviations ≈ ±140
    assert all(routes.resolve("challenger") == "m-v2" for _ in range(100))  # explicit challenger traffic stays
    routes.set_canary(0.0)
    assert all(routes.resolve("champion") == "m-v1" for _ in range(500))
    with pytest.raises(ValueError, match="between 0 and 1"):
        routes.set_canary(1.5)


def test_no_canary_without_a_challenger() -> None:
    routes = RouteTable({"champion": "m-v1"}, canary_share=1.0)
    assert routes.resolve("champion") == "m-v1"


def test_registered_names_parse_to_their_route_or_version() -> None:
    registered = (Version("retail", "1", {}), Version("retail", "2", {}), Version("clinic", "1", {}))
    catalog = Catalog(
        versions={v.served: v for v in registered},
        aliases={"retail": {"champion": "2", "challenger": "1"}, "clinic": {"champion": "1"}},
    )
    assert Name.parse("retail/1") == Name("retail", version="1")
    assert Name.parse("retail@challenger") == Name("retail", key="retail@challenger")
    assert Name.parse("retail").routed(catalog) == Name("retail", key="retail@champion")
    assert Name.parse("base").routed(catalog) == Name(None, key="base")
    assert Name.parse("champion", "clinic") == Name("clinic", key="clinic@champion")
    assert Name.parse("champion") == Name(None, key="champion")  # no default model: a fixed alias, if any
    assert Name.parse("retail@") == Name("retail")  # names nothing: unknown
    assert catalog.routes() == {
        "retail@champion": "retail-v2",
        "retail@challenger": "retail-v1",
        "clinic@champion": "clinic-v1",
    }
    assert catalog.pinned() == {"retail-v2", "clinic-v1"} and catalog.models == {"retail", "clinic"}


def test_canary_and_refresh_work_per_registered_model() -> None:
    routes = RouteTable({"base": "base"}, canary_share=1.0, seed=1)
    routes.replace({"base": "base", "a@champion": "a-v2", "a@challenger": "a-v3", "b@champion": "b-v1"})
    assert routes.switches == 3
    assert routes.resolve("a@champion") == "a-v3"  # every champion request to its own challenger
    assert routes.resolve("b@champion") == "b-v1"  # no challenger: no canary
    routes.replace({"base": "base", "a@champion": "a-v2", "b@champion": "b-v2"})
    assert routes.switches == 4 and routes.resolve("a@challenger") is None
