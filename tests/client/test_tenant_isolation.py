"""Tenant isolation: a tenant's search returns only rows it may see, and ``min(k, visible)`` of them.

The randomized test keeps its own model of who holds what (id -> set of tenants), applies
adds, grants, revokes, deletes, dropped tenants, offloads, flushes and a reopen to both
the collection and the model, and checks every returned id of more than 100,000 tenant
queries against it (a quarter of them with an attribute filter as well). Tenant sizes are
Zipf-like, so every planner path runs: small tenants are scanned exactly, the largest take
the filtered IVF plan, or their own IVF (built while rows come, go and change hands, so
it serves rows added since and skips rows gone since); later adds stay unflushed.
"""

from __future__ import annotations

import numpy as np
import pytest

import tierstore
from tierstore.errors import FilterError, InvalidArgument, InvalidType, NotFound

DIM = 16
SCHEMA = {"section": "keyword"}
SECTIONS = ("a", "b", "c")


def points(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Clustered vectors (the IVF plan has lists worth choosing between)."""
    which = rng.integers(0, len(centres), n)
    return (centres[which] + rng.standard_normal((n, DIM))).astype(np.float32)


class Model:
    """Who may see what: ``holders[id]`` is the set of tenants holding row ``id``."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}
        self.members: dict[str, set[int]] = {}
        self.vectors: dict[int, np.ndarray] = {}
        self.section: dict[int, str] = {}

    def add(self, tenant: str, ids, x: np.ndarray, sections) -> None:
        for i, v, s in zip(ids, x, sections):
            self.holders[int(i)] = {tenant}
            self.vectors[int(i)] = v
            self.section[int(i)] = s
        self.members.setdefault(tenant, set()).update(int(i) for i in ids)

    def grant(self, ids, tenant: str) -> None:
        for i in ids:
            self.holders[int(i)].add(tenant)
        self.members.setdefault(tenant, set()).update(int(i) for i in ids)

    def revoke(self, ids, tenant: str) -> None:
        for i in ids:
            self.holders[int(i)].discard(tenant)
        self.members.get(tenant, set()).difference_update(int(i) for i in ids)

    def drop(self, tenant: str) -> None:
        self.revoke(list(self.members.get(tenant, ())), tenant)

    def live(self) -> list[int]:
        return [i for i, held in self.holders.items() if held]

    def visible(self, tenant: str) -> np.ndarray:
        return np.array(sorted(self.members.get(tenant, ())), dtype=np.int64)

    def tenants(self) -> set[str]:
        return {name for name, ids in self.members.items() if ids}


# Attribute filters a tenant adds to its search, with the sections each lets through.
FILTERS = [
    ({"section": "a"}, {"a"}),
    ({"section": {"$in": ["a", "b"]}}, {"a", "b"}),
    ({"section": {"$ne": "c"}}, {"a", "b"}),
    ({"$or": [{"section": "c"}, {"section": {"$ne": "c"}}]}, set(SECTIONS)),  # everything: still one tenant
]


def check_search(col, model: Model, name: str, xq: np.ndarray, k: int, plans: dict, hits: list,
                 spec: tuple | None = None) -> int:
    """One tenant query batch against the model; returns the number of query rows checked."""
    res = col.tenant(name).search(xq, k=k, filter=spec[0] if spec else None)
    visible = model.visible(name)
    if spec:
        visible = visible[[model.section[int(i)] in spec[1] for i in visible]] if visible.size else visible
    assert res.ids.shape == (len(xq), k)
    got = res.ids >= 0
    want = min(k, visible.size)
    counts = got.sum(axis=1)
    assert (counts == want).all(), (name, k, visible.size, counts.min(), counts.max(), res.stats)
    assert got[:, :want].all() and not got[:, want:].any()  # results first, padding after
    found = res.ids[got]
    leaked = found[~np.isin(found, visible)]
    assert leaked.size == 0, (name, sorted(set(leaked.tolist()))[:10], [model.holders.get(int(i)) for i in leaked[:5]])
    assert np.isinf(res.distances[~got]).all() and np.isfinite(res.distances[got]).all()
    if want > 1:
        assert (np.diff(res.distances[:, :want], axis=1) >= -1e-5).all()  # nearest first
        assert all(len(set(row[:want].tolist())) == want for row in res.ids)  # no id twice
    if want:
        plan = res.stats.get("plan", "?")
        plans[plan] = plans.get(plan, 0) + len(xq)
        scoring = f"scoring:{res.stats.get('scoring')}"  # how filtered_ivf scored the lists
        plans[scoring] = plans.get(scoring, 0) + len(xq)
        # Recall against the exact top-k of the tenant's rows: exact for the exact plan.
        vecs = np.stack([model.vectors[int(i)] for i in visible])
        d = ((xq[:, None, :] - vecs[None]) ** 2).sum(-1)
        truth = visible[np.argsort(d, axis=1)[:, :want]]
        recall = np.mean([len(set(a[:want].tolist()) & set(b.tolist())) / want for a, b in zip(res.ids, truth)])
        hits.append((plan, recall, len(xq)))
    return len(xq)


@pytest.mark.parametrize("background", [False, True], ids=["ivf-inline", "ivf-background"])
def test_randomized_isolation(tmp_path, monkeypatch, background):
    from tierstore.client import tenants as tenants_module
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BUDGET", 1.0)  # 16 dimensions: room for t000's own IVF
    # Tenant IVFs trained inside the search that asks (deterministic) or on the background thread.
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BACKGROUND", background)
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((48, DIM)).astype(np.float32) * 3
    n_tenants, n_rows = 160, 12_000
    names = [f"t{r:03d}" for r in range(n_tenants)]
    weights = 1.0 / np.arange(1, n_tenants + 1)  # Zipf: t000 ~2,000 rows, t001 ~1,000, the smallest ~10
    weights /= weights.sum()
    owner = np.concatenate([np.arange(n_tenants), rng.choice(n_tenants, n_rows - n_tenants, p=weights)])
    x = points(n_rows, rng, centres)
    sections = [SECTIONS[s] for s in rng.integers(0, 3, n_rows)]
    model = Model()
    db = tierstore.connect(tmp_path, flush_rows=1_000_000)  # later adds stay in the exact delta
    col = db.create_collection("c", dim=DIM, attributes=SCHEMA)
    for r, name in enumerate(names):
        ids = np.flatnonzero(owner == r)
        col.tenant(name).add(ids, x[ids], [{"section": sections[i]} for i in ids])
        model.add(name, ids, x[ids], [sections[i] for i in ids])
    # Share ~5% of the rows with a second tenant before the build, so grants are indexed too.
    shared = rng.choice(n_rows, n_rows // 20, replace=False)
    for target in rng.choice(n_tenants, 40, p=weights):
        batch = rng.choice(shared, 15, replace=False)
        col.grant(batch, names[target])
        model.grant(batch, names[target])
    for target in ("t000", "t001", "t002"):  # big shares: three tenants above the exact plan's limit
        batch = rng.choice(n_rows, 600, replace=False)
        col.grant(batch, target)
        model.grant(batch, target)
    col.build_index()

    next_id = n_rows
    dropped: list[str] = []
    plans: dict[str, int] = {}
    hits: list = []
    searched = 0
    for round_ in range(12):
        # Adds (unflushed), to existing tenants and now and then to a new one.
        for _ in range(12):
            name = names[rng.choice(n_tenants, p=weights)] if rng.random() < 0.85 else f"new{next_id}"
            n = int(rng.integers(1, 40))
            ids = np.arange(next_id, next_id + n)
            next_id += n
            xs = points(n, rng, centres)
            secs = [SECTIONS[s] for s in rng.integers(0, 3, n)]
            col.tenant(name).add(ids, xs, [{"section": s} for s in secs])
            model.add(name, ids, xs, secs)
            if name not in names:
                names.append(name)
        live = np.array(model.live())
        # Grants: to big and small tenants alike, some repeated (idempotent), some to brand-new names.
        for _ in range(8):
            batch = rng.choice(live, int(rng.integers(1, 60)), replace=False)
            name = names[rng.integers(0, len(names))] if rng.random() < 0.9 else f"guest{round_}"
            col.grant(batch, name)
            model.grant(batch, name)
            if name not in names:
                names.append(name)
        # Revokes: of the grantee, of the original owner, and of ids the tenant never held.
        multi = np.array([i for i in live if len(model.holders[int(i)]) >= 2])
        for i in rng.choice(multi, min(40, multi.size), replace=False):
            name = sorted(model.holders[int(i)])[int(rng.integers(0, len(model.holders[int(i)])))]
            col.revoke([int(i)], name)
            model.revoke([int(i)], name)
        holding = sorted(model.tenants())
        stranger = holding[int(rng.integers(0, len(holding)))]
        foreign = [int(i) for i in rng.choice(live, 20) if stranger not in model.holders[int(i)]]
        if foreign:
            col.revoke(foreign, stranger)  # not held: nothing changes
        # Deletes through a tenant handle: its access goes; the row dies when nobody else holds it.
        for _ in range(6):
            name = names[int(rng.integers(0, len(names)))]
            mine = model.visible(name)
            if mine.size:
                gone = rng.choice(mine, min(mine.size, int(rng.integers(1, 30))), replace=False)
                col.tenant(name).delete(gone)
                model.revoke(gone, name)
                for i in gone:
                    if not model.holders[int(i)]:
                        del model.holders[int(i)]
        # A tenant is dropped every other round (never the largest: it keeps the IVF plan busy).
        if round_ % 2 == 1:
            candidates = [n for n in sorted(model.tenants()) if n != "t000" and n not in dropped]
            name = candidates[int(rng.integers(0, len(candidates)))]
            col.drop_tenant(name)
            model.drop(name)
            for i in [i for i, held in model.holders.items() if not held]:
                del model.holders[i]
            dropped.append(name)
            with pytest.raises(NotFound):
                col.drop_tenant(name)
        if round_ == 4:
            col.flush()  # fold the delta into the index (LIRE), with tenants on both sides
        if round_ == 7:  # memberships must be durable: reopen and go on
            db.close()
            db = tierstore.connect(tmp_path, flush_rows=1_000_000)
            col = db.collection("c")
        # Search every tenant ever named (dropped ones must come back empty), some after an offload.
        order = list(names) + ["nobody"] + ["t000", "t001", "t002"] * 6  # the big ones more often
        rng.shuffle(order)
        offload_at = len(order) // 2
        for j, name in enumerate(order):
            if j == offload_at:
                col.offload_tenants(keep=int(rng.integers(0, 30)))
            k = int(rng.choice([1, 5, 10, 10, 10, 50]))
            anchors = rng.choice(live, 48)
            xq = np.stack([model.vectors[int(i)] for i in anchors])
            xq = xq + 0.3 * rng.standard_normal(xq.shape).astype(np.float32)
            spec = FILTERS[int(rng.integers(0, len(FILTERS)))] if rng.random() < 0.25 else None
            searched += check_search(col, model, name, xq, k, plans, hits, spec)
        col.offload_tenants(keep=int(rng.integers(0, 10)))
        assert set(col.tenants()) == model.tenants()
        for name in rng.choice(names, 10):
            assert col.tenant(str(name)).count() == model.visible(str(name)).size

    assert searched >= 100_000, searched
    assert plans.get("exact", 0) and plans.get("filtered_ivf", 0), plans  # both planner paths ran
    assert plans.get("tenant_ivf", 0), plans  # and t000 (~2,600 rows) searched its own IVF
    # filtered_ivf scored both ways: the code scan, and exact scoring of the tenant's rows per list
    assert plans.get("scoring:codes", 0) and plans.get("scoring:exact", 0), plans
    for plan, floor in (("exact", 0.999), ("filtered_ivf", 0.85), ("tenant_ivf", 0.85)):
        rows = [(r, n) for p, r, n in hits if p == plan]
        recall = sum(r * n for r, n in rows) / sum(n for _, n in rows)
        assert recall >= floor, (plan, recall)
    memberships = sum(len(v) for v in model.members.values())
    stats = col.tenant_stats()
    assert stats["tenant_ivf_loads"] >= 1, stats  # t000's IVF came back from the durable tier after an offload
    assert stats["tenants"] == len(model.tenants()) and stats["memberships"] == memberships  # live ones only
    col.build_index()  # a rebuild renumbers every row: the tenant index must follow
    assert col.tenant_stats()["memberships"] == memberships
    for name in rng.choice(names, 60, replace=False):
        anchors = rng.choice(np.array(model.live()), 16)
        check_search(col, model, str(name), np.stack([model.vectors[int(i)] for i in anchors]), 10, plans, hits)
    db.close()
    # Reopened once more: the same visibility from the stored state alone.
    with tierstore.connect(tmp_path) as db:
        col = db.collection("c")
        assert set(col.tenants()) == model.tenants()
        for name in list(model.tenants())[:40] + dropped:
            anchors = rng.choice(np.array(model.live()), 8)
            check_search(col, model, name, np.stack([model.vectors[int(i)] for i in anchors]), 10, plans, hits)


@pytest.fixture
def two_tenants(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((8, DIM)).astype(np.float32) * 3
    x = points(600, rng, centres)
    db = tierstore.connect(tmp_path)
    col = db.create_collection("c", dim=DIM, attributes=SCHEMA)
    sections = [{"section": SECTIONS[i % 3]} for i in range(600)]
    col.tenant("acme").add(np.arange(300), x[:300], sections[:300])
    col.tenant("beta").add(np.arange(300, 600), x[300:], sections[300:])
    yield db, col, x
    db.close()


def test_unknown_tenant_is_empty_and_admin_calls_say_not_found(two_tenants):
    _, col, x = two_tenants
    res = col.tenant("nobody").search(x[:3], k=4)
    assert res.ids.shape == (3, 4) and (res.ids == -1).all() and np.isinf(res.distances).all()
    assert col.tenant("nobody").count() == 0
    for admin in (lambda: col.drop_tenant("nobody"), lambda: col.revoke([0], "nobody")):
        with pytest.raises(NotFound):
            admin()
    assert sorted(col.tenants()) == ["acme", "beta"]
    for bad in ("", None, 3):
        with pytest.raises((InvalidArgument, InvalidType)):
            col.tenant(bad)


def test_tenant_and_attribute_filters_both_apply(two_tenants):
    _, col, x = two_tenants
    for k in (5, 200):
        res = col.tenant("acme").search(x[::7], k=k, filter={"section": "b"})
        found = res.ids[res.ids >= 0]
        assert found.size and (found < 300).all() and (found % 3 == 1).all()
        assert ((res.ids >= 0).sum(axis=1) == min(k, 100)).all()
    col.grant([301, 304], "acme")  # section "c" and "b" rows of beta's
    res = col.tenant("acme").search(x[301], k=200, filter={"section": {"$in": ["b", "c"]}})
    found = set(res.ids[res.ids >= 0].tolist())
    assert {301, 304} <= found and all(i < 300 or i in (301, 304) for i in found)


@pytest.mark.parametrize("spec", [
    {"$or": [{"section": "a"}, {"section": {"$ne": "a"}}]},
    {"$or": [{}, {"section": "a"}]},
    {"section": {"$nin": ["zzz"]}},
    {},
])
def test_crafted_filters_stay_inside_the_tenant(two_tenants, spec):
    _, col, x = two_tenants
    res = col.tenant("acme").search(x[300:340], k=50, filter=spec)  # beta's own vectors as queries
    found = res.ids[res.ids >= 0]
    assert found.size and (found < 300).all()


@pytest.mark.parametrize("name", ["__tenants", "__tenant", "_tenant", "tenant", "tenants", "$tenant", "_tenants"])
def test_internal_tenant_attributes_are_not_reachable_by_filters(two_tenants, name):
    _, col, x = two_tenants
    for spec in ({name: "beta"}, {"$or": [{name: "beta"}, {"section": "a"}]}, {name: {"$ne": "acme"}}):
        try:
            res = col.tenant("acme").search(x[300:310], k=20, filter=spec)
        except FilterError:
            continue
        found = res.ids[res.ids >= 0]
        assert (found < 300).all(), (spec, found)
    with pytest.raises(FilterError):
        col.tenant("acme").search(x[0], k=3, filter={"colour": "red"})


def test_a_user_attribute_named_like_the_tenant_field_grants_nothing(tmp_path):
    """A schema may not smuggle tenant membership in through an attribute value."""
    x = np.random.default_rng(5).standard_normal((40, DIM)).astype(np.float32)
    with tierstore.connect(tmp_path) as db:
        for name in ("__tenants", "tenants"):
            try:
                col = db.create_collection(f"c{name}", dim=DIM, attributes={name: "keywords"})
            except InvalidArgument:
                continue  # reserved: refused up front, fine
            col.tenant("acme").add(np.arange(20), x[:20], [{name: ["beta"]}] * 20)
            col.tenant("beta").add(np.arange(20, 40), x[20:], [{name: ["acme"]}] * 20)
            for tenant, own in (("acme", range(20)), ("beta", range(20, 40))):
                for spec in (None, {name: "beta"}, {name: "acme"}):
                    res = col.tenant(tenant).search(x, k=40, filter=spec)
                    assert set(res.ids[res.ids >= 0].tolist()) <= set(own), (name, tenant, spec)


def test_memberships_survive_reopen(tmp_path):
    x = np.random.default_rng(9).standard_normal((300, DIM)).astype(np.float32)
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=DIM)
        col.tenant("acme").add(np.arange(100), x[:100])
        col.tenant("beta").add(np.arange(100, 200), x[100:200])
        col.tenant("gone").add(np.arange(200, 300), x[200:])
        col.grant([100, 101, 250], "acme")
        col.revoke([101], "acme")
        col.tenant("beta").delete([102])
        col.drop_tenant("gone")
    with tierstore.connect(tmp_path) as db:  # from the WAL
        col = db.collection("c")
        assert sorted(col.tenants()) == ["acme", "beta"]
        acme = set(col.tenant("acme").search(x, k=300).ids[0].tolist()) - {-1}
        assert acme == set(range(100)) | {100, 250}
        beta = set(col.tenant("beta").search(x, k=300).ids[0].tolist()) - {-1}
        assert beta == set(range(100, 200)) - {102}
        assert col.count() == 200  # 250 stays for acme; the rest of gone's rows and 102 died
        col.build_index()
        col.flush()
    with tierstore.connect(tmp_path) as db:  # from the checkpoint
        col = db.collection("c")
        assert set(col.tenant("acme").search(x[:5], k=300).ids[0].tolist()) - {-1} == acme
        assert set(col.tenant("beta").search(x[:5], k=300).ids[0].tolist()) - {-1} == beta
        assert (col.tenant("gone").search(x[:5], k=5).ids == -1).all()
