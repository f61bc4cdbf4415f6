"""The response store's bounds (count, bytes, TTL; least recently used first) and scopes."""
from app.api.responses.store import ResponseStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(rid: str, text: str = "") -> dict:
    return {"id": rid, "object": "response", "output_text": text}


def ids(store: ResponseStore, scope: str = "a") -> list[str]:
    return [rid for rid in ("r1", "r2", "r3", "r4") if store.get(scope, rid) is not None]


def test_a_stored_response_comes_back_with_its_conversation():
    store = ResponseStore()
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert store.put("a", response("r1", "hello"), conversation)
    entry = store.get("a", "r1")
    assert entry.response == response("r1", "hello") and entry.conversation == conversation
    assert store.get("a", "nope") is None


def test_count_bound_evicts_the_least_recently_used():
    store = ResponseStore(max_count=3)
    for rid in ("r1", "r2", "r3"):
        store.put("a", response(rid), [])
    store.get("a", "r1")  # r2 is now the least recently used
    store.put("a", response("r4"), [])
    assert len(store) == 3 and store.get("a", "r2") is None
    assert {"r1", "r3", "r4"} == set(ids(store))


def test_byte_bound_evicts_until_the_new_one_fits():
    probe = ResponseStore()  # the size of one entry, measured the store's way
    probe.put("a", response("r1", "x" * 100), [])
    size = probe.bytes
    store = ResponseStore(max_bytes=3 * size)
    for rid in ("r1", "r2", "r3"):
        assert store.put("a", response(rid, "x" * 100), [])
    assert store.bytes == 3 * size
    store.get("a", "r1")
    store.put("a", response("r4", "x" * 100), [])
    assert ids(store) == ["r1", "r3", "r4"] and store.bytes == 3 * size


def test_a_response_larger_than_the_whole_budget_is_not_kept():
    store = ResponseStore(max_bytes=200)
    store.put("a", response("r1"), [])
    assert not store.put("a", response("r2", "x" * 500), [])
    assert ids(store) == ["r1"]


def test_conversations_count_toward_the_bytes():
    store = ResponseStore()
    store.put("a", response("r1"), [])
    bare = store.bytes
    store.put("a", response("r2"), [{"role": "user", "content": "y" * 1000}])
    assert store.bytes - bare > bare + 1000


def test_entries_expire_after_the_ttl_even_when_used():
    clock = Clock()
    store = ResponseStore(ttl_s=60, clock=clock)
    store.put("a", response("r1"), [])
    clock.now += 30
    store.put("a", response("r2"), [])
    clock.now += 29
    assert ids(store) == ["r1", "r2"]  # reading does not extend the TTL
    clock.now += 1
    assert ids(store) == ["r2"]
    clock.now += 30
    assert ids(store) == [] and len(store) == 0 and store.bytes == 0


def test_a_client_sees_only_its_own_responses():
    store = ResponseStore()
    store.put("a", response("r1"), [])
    store.put("b", response("r2"), [])
    assert ids(store, "a") == ["r1"] and ids(store, "b") == ["r2"]
    assert not store.delete("b", "r1")  # nor can it delete another's
    assert store.get("a", "r1") is not None


def test_delete_removes_and_frees_the_bytes():
    store = ResponseStore()
    store.put("a", response("r1"), [])
    assert store.delete("a", "r1") and store.get("a", "r1") is None
    assert store.bytes == 0 and not store.delete("a", "r1")


def test_storing_an_id_again_replaces_it():
    store = ResponseStore(max_count=2)
    store.put("a", response("r1", "old"), [])
    store.put("a", response("r2"), [])
    store.put("a", response("r1", "new"), [])
    assert len(store) == 2 and store.get("a", "r1").response["output_text"] == "new"
