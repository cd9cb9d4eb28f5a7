import json
from pathlib import Path

import pytest

from agent.errors import Conflict, ImageInUse, ImageNotFound, InvalidArgument
from agent.images.content import ContentStore
from agent.images.manifest import chain_ids
from agent.images.reference import parse
from agent.images.snapshots import OverlaySnapshotter
from agent.images.store import ImageRecord, ImageStore, LayerRecord, match_filters, parse_filters
from agent.metadata import Database


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    db = Database(tmp_path / "meta.db")
    return ImageStore(db, ContentStore(tmp_path / "content"), OverlaySnapshotter(tmp_path / "snaps", db))


def add_image(store: ImageStore, name: str | None, layers: list[bytes], created: int = 1) -> ImageRecord:
    diff_ids = [store.content.write_bytes(layer) for layer in layers]  # stand-ins for layer blobs
    chains = chain_ids(diff_ids)
    for i, chain in enumerate(chains):
        if store.snapshots.get(chain) is None:
            snap = store.snapshots.begin_layer(chain, chains[i - 1] if i else "", diff_ids[i])
            (snap.path / "fs" / "f").write_bytes(layers[i])
            store.snapshots.commit(snap, len(layers[i]))
    config = store.content.write_bytes(json.dumps({"created": created, "layers": [d for d in diff_ids]}).encode())
    manifest = store.content.write_bytes(json.dumps({"config": config}).encode())
    record = ImageRecord(id=config, manifest_digest=manifest, manifest_media_type="m", config_digest=config,
                         created=created, size=sum(map(len, layers)), os="linux", architecture="amd64",
                         top_chain_id=chains[-1])
    ref = parse(name) if name else None
    store.add(record, [config, manifest, *diff_ids],
              [LayerRecord(c, d, d, "application/vnd.oci.image.layer.v1.tar") for c, d in zip(chains, diff_ids)],
              ref, f"{ref.name}@{manifest}" if ref else None)
    got = store.get(record.id)
    assert got is not None
    return got


def test_resolve_by_name_and_id(store: ImageStore) -> None:
    rec = add_image(store, "127.0.0.1:5000/busybox:1", [b"base"])
    assert store.resolve("127.0.0.1:5000/busybox:1").id == rec.id
    assert store.resolve(rec.id).id == rec.id
    assert store.resolve(rec.short_id).id == rec.id
    assert store.resolve(rec.id.removeprefix("sha256:")[:5]).id == rec.id
    assert store.resolve(rec.repo_digests[0]).id == rec.id
    with pytest.raises(ImageNotFound, match="No such image: nope"):
        store.resolve("nope")
    with pytest.raises(InvalidArgument):
        store.resolve("")


def test_tag_and_untag_keeps_image_until_last(store: ImageStore) -> None:
    rec = add_image(store, "busybox:1", [b"base"])
    store.tag("busybox:1", "other/name:2")
    result = store.remove("other/name:2")
    assert result.untagged == ["other/name:2"] and result.deleted == []
    assert store.get(rec.id) is not None
    result = store.remove("busybox:1")
    assert result.deleted == [rec.id]
    assert "busybox:1" in result.untagged
    assert store.get(rec.id) is None
    assert not store.content.digests()
    assert not list(store.snapshots.root.iterdir())


def test_remove_by_id_needs_force_for_several_repos(store: ImageStore) -> None:
    rec = add_image(store, "a:1", [b"x"])
    store.tag("a:1", "b:1")
    with pytest.raises(ImageInUse, match="must be forced"):
        store.remove(rec.short_id)
    result = store.remove(rec.short_id, force=True)
    assert result.deleted == [rec.id]


def test_shared_layers_survive_removal_of_one_image(store: ImageStore) -> None:
    a = add_image(store, "a:1", [b"base", b"top-a"])
    b = add_image(store, "b:1", [b"base", b"top-b"])
    assert len(list(store.snapshots.root.iterdir())) == 3  # base unpacked once
    store.remove("a:1")
    assert store.get(a.id) is None and store.get(b.id) is not None
    assert store.snapshots.get(chain_ids([store.layers(b.id)[0].diff_id])[0]) is not None
    assert len(list(store.snapshots.root.iterdir())) == 2
    store.remove("b:1")
    assert not list(store.snapshots.root.iterdir())


def test_retag_leaves_dangling_and_prune(store: ImageStore) -> None:
    old = add_image(store, "app:1", [b"v1"], created=1)
    new = add_image(store, "app:1", [b"v2"], created=2)
    dangling = store.get(old.id)
    assert dangling is not None and dangling.tags == []
    flt = parse_filters(["dangling=true"])
    assert [r.id for r in store.records() if match_filters(r, flt)] == [old.id]
    result = store.prune()
    assert result.deleted == [old.id]
    assert store.get(new.id) is not None
    assert store.prune(all_images=True).deleted == [new.id]


def test_reference_filter(store: ImageStore) -> None:
    add_image(store, "busybox:1", [b"x"])
    add_image(store, "alpine:3", [b"y"])
    names = lambda f: sorted(r.tags[0] for r in store.records() if match_filters(r, parse_filters([f])))  # noqa: E731
    assert names("reference=busybox") == ["docker.io/library/busybox:1"]
    assert names("reference=*:3") == ["docker.io/library/alpine:3"]
    with pytest.raises(InvalidArgument):
        parse_filters(["bogus=1"])


def test_leases_protect_from_gc(store: ImageStore) -> None:
    digest = store.content.write_bytes(b"in flight")
    store.leases.add([digest])
    store.gc()
    assert store.content.has(digest)
    store.leases.release([digest])
    store.gc()
    assert not store.content.has(digest)


def test_snapshot_recover_and_mounts(store: ImageStore) -> None:
    snaps = store.snapshots
    pending = snaps.begin_layer("sha256:" + "a" * 64, "", "sha256:" + "a" * 64)
    (snaps.root / "999").mkdir()
    with pytest.raises(Conflict):
        snaps.begin_layer("sha256:" + "a" * 64, "", "")
    assert snaps.recover() == 2
    assert not pending.path.exists() and not (snaps.root / "999").exists()
    rec = add_image(store, "x:1", [b"1", b"2", b"3"])
    view = snaps.view(rec.top_chain_id)
    assert view[0].type == "overlay"
    lower = view[0].options[1].removeprefix("lowerdir=").split(":")
    assert len(lower) == 3 and lower[0].endswith("/fs")
    rw = snaps.prepare("container-1", rec.top_chain_id)
    assert any(o.startswith("upperdir=") for o in rw[0].options)
    with pytest.raises(Conflict):
        snaps.remove(rec.top_chain_id)  # the container snapshot is its child
