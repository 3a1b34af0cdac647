"""The JSON file that keeps push targets made through the API."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from callboard.errors import PushStoreError
from callboard.push.store import JsonFileStore, StoredTarget


async def test_what_is_saved_is_loaded_and_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "push.json"
    store = JsonFileStore(path)
    assert await store.load() == {}
    crm = StoredTarget({"url": "http://x", "topics": ["a"], "secret": "whsec_AAAA"}, "service=ops")
    await store.save({"crm": crm, "old": StoredTarget({"url": "http://y"}, None)})
    assert await JsonFileStore(path).load() == {
        "crm": crm,
        "old": StoredTarget({"url": "http://y"}, None),
    }
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    await store.save({})
    assert await store.load() == {}
    assert [p.name for p in path.parent.iterdir()] == ["push.json"]  # no temporary file left


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"push": []}',
        '["x"]',
        '{"push": {"a": 1}}',
        '{"push": {}, "owners": []}',
        '{"push": {}, "owners": {"a": 1}}',
    ],
)
async def test_a_file_that_is_not_a_store_stops_the_start(tmp_path: Path, text: str) -> None:
    path = tmp_path / "push.json"
    path.write_text(text)
    with pytest.raises(PushStoreError) as caught:
        await JsonFileStore(path).load()
    assert "(events.pushStorePath)" in str(caught.value)


async def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "push.json"
    store = JsonFileStore(path)
    await store.save({"a": StoredTarget({"url": "http://a"}, "service=ops")})
    inode = os.stat(path).st_ino
    await store.save({"b": StoredTarget({"url": "http://b"}, "service=ops")})
    assert os.stat(path).st_ino != inode  # a new file renamed over the old one
    document = json.loads(path.read_text())
    assert document["push"] == {"b": {"url": "http://b"}}
    assert document["owners"] == {"b": "service=ops"}


async def test_the_repr_of_a_stored_target_holds_no_secret(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "push.json")
    section = {"secret": "whsec_czNjcjN0", "headers": {"authorization": "Bearer s3cr3t"}}
    await store.save({"crm": StoredTarget(section, "service=ops")})
    loaded = await store.load()
    assert loaded["crm"].section == section
    shown = repr(loaded)
    assert "service=ops" in shown
    assert "czNjcjN0" not in shown
    assert "s3cr3t" not in shown
