"""A Hypothesis state machine over the tracker: random sequences of the engine's operations
against a model of what the tracker must remember, checked through a second connection."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from methodic import (
    DONE_STATES,
    UNFINISHED_STATES,
    ComponentSpec,
    ComponentState,
    InvalidInputError,
    UploadTracker,
)
from methodic import _tracker_ops as ops

PATHS = st.sampled_from(["a", "b", "c/d", "c/e", "f.bin"])
COMPONENT_STATES = st.sampled_from(list(ComponentState))
ASSET_STATES = st.sampled_from(sorted(UNFINISHED_STATES | DONE_STATES))


@dataclass
class ModelComponent:
    state: str = "queued"
    parts: set[int] = field(default_factory=set)


@dataclass
class ModelAsset:
    state: str = "registered"
    sealed: bool = False
    components: dict[str, ModelComponent] = field(default_factory=dict)


class TrackerMachine(RuleBasedStateMachine):
    asset_ids = Bundle("asset_ids")

    @initialize()
    def open(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-sm-"))
        self.file = self.dir / "f"
        self.file.write_bytes(b"0123456789")
        self.tracker = UploadTracker(self.dir / "u.sqlite")
        self.reader = UploadTracker(self.dir / "u.sqlite")  # another connection, as another process
        self.model: dict[str, ModelAsset] = {}
        self.counter = 0

    def teardown(self) -> None:
        if hasattr(self, "tracker"):
            self.tracker.close()
            self.reader.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _specs(self, paths: list[str]) -> list[ComponentSpec]:
        return [ComponentSpec(p, self.file, 10) for p in paths]

    # ---- registration ---------------------------------------------------------------------

    @rule(
        target=asset_ids,
        paths=st.lists(PATHS, min_size=1, max_size=4, unique=True),
        seal=st.booleans(),
    )
    def register_new(self, paths: list[str], seal: bool) -> str:
        self.counter += 1
        asset_id = f"asset-{self.counter}"
        self.tracker.register_components(asset_id, self._specs(paths), asset_type="ckpt", seal=seal)
        self.model[asset_id] = ModelAsset(
            sealed=seal, components={p: ModelComponent() for p in paths}
        )
        return asset_id

    @rule(
        asset_id=asset_ids,
        paths=st.lists(PATHS, min_size=1, max_size=3, unique=True),
        seal=st.booleans(),
    )
    def register_more(self, asset_id: str, paths: list[str], seal: bool) -> None:
        asset = self.model[asset_id]
        refused = (
            asset.sealed
            or asset.state in ("finalized", "discarded")
            or bool(set(paths) & set(asset.components))
        )
        if refused:
            with pytest.raises(InvalidInputError):
                self.tracker.register_components(
                    asset_id, self._specs(paths), asset_type="ckpt", seal=seal
                )
            return  # all or nothing: the model is unchanged, and so must the tracker be
        self.tracker.register_components(asset_id, self._specs(paths), asset_type="ckpt", seal=seal)
        asset.sealed = seal
        asset.components.update({p: ModelComponent() for p in paths})

    @rule(asset_id=asset_ids)
    def seal(self, asset_id: str) -> None:
        self.tracker.seal(asset_id)
        self.model[asset_id].sealed = True

    @rule()
    def seal_unknown(self) -> None:
        with pytest.raises(InvalidInputError):
            self.tracker.seal("no-such-asset")

    # ---- the engine's transitions ---------------------------------------------------------

    @rule(asset_id=asset_ids, path=PATHS, state=COMPONENT_STATES)
    def set_component_state(self, asset_id: str, path: str, state: str) -> None:
        self.tracker._execute(ops.set_component_state(asset_id, path, state))
        component = self.model[asset_id].components.get(path)
        if component is not None:
            component.state = state

    @rule(
        asset_id=asset_ids, paths=st.lists(PATHS, max_size=5, unique=True), state=COMPONENT_STATES
    )
    def mark_components(self, asset_id: str, paths: list[str], state: str) -> None:
        self.tracker._execute(ops.mark_components(asset_id, paths, state, sizes_done=True))
        for p in paths:
            if p in self.model[asset_id].components:
                self.model[asset_id].components[p].state = state

    @rule(
        asset_id=asset_ids,
        state=ASSET_STATES,
        only_from=st.one_of(st.none(), st.lists(ASSET_STATES, min_size=1, max_size=3)),
    )
    def set_asset_state(self, asset_id: str, state: str, only_from: list[str] | None) -> None:
        changed = self.tracker._execute(ops.set_asset_state(asset_id, state, only_from=only_from))
        asset = self.model[asset_id]
        expected = only_from is None or asset.state in only_from
        assert changed == expected
        if expected:
            asset.state = state

    @rule(asset_id=asset_ids)
    def reset_failed(self, asset_id: str) -> None:
        reset = self.tracker._execute(ops.reset_failed(asset_id))
        expected = {
            p
            for p, c in self.model[asset_id].components.items()
            if c.state in ("failed", "uploading")
        }
        assert set(reset) == expected
        for p in expected:
            self.model[asset_id].components[p].state = "queued"

    @rule(asset_id=asset_ids, path=PATHS, part=st.integers(1, 4))
    def record_part(self, asset_id: str, path: str, part: int) -> None:
        component = self.model[asset_id].components.get(path)
        if component is None:
            return  # the engine only records parts of registered components (a FOREIGN KEY)
        self.tracker._execute(ops.record_part(asset_id, path, part, etag=f'"etag-{part}"'))
        component.parts.add(part)

    @rule(asset_id=consumes(asset_ids))
    def discard(self, asset_id: str) -> None:
        assert self.tracker.discard(asset_id)
        asset = self.model[asset_id]
        asset.state = "discarded"
        for c in asset.components.values():
            c.parts.clear()

    @precondition(lambda self: bool(getattr(self, "model", None)))
    @rule(target=asset_ids)
    def recall(self) -> object:
        return multiple(*sorted(a for a, m in self.model.items() if m.state != "discarded"))

    # ---- what must always hold ------------------------------------------------------------

    @invariant()
    def pending_is_every_unfinished_asset(self) -> None:
        if not hasattr(self, "reader"):
            return
        pending = {a.asset_id for a in self.reader.get_pending_uploads()}
        assert pending == {a for a, m in self.model.items() if m.state in ops.UNFINISHED_STATES}

    @invariant()
    def assets_match_the_model(self) -> None:
        if not hasattr(self, "reader"):
            return
        for asset_id, model in self.model.items():
            tracked = self.reader.get_asset(asset_id)
            assert tracked is not None
            assert (tracked.state, tracked.sealed) == (model.state, model.sealed)
            assert {c.path: c.state for c in tracked.components} == {
                p: c.state for p, c in model.components.items()
            }
            assert {c.path: set(c.parts_done) for c in tracked.components} == {
                p: c.parts for p, c in model.components.items()
            }
            complete = model.sealed and all(
                c.state == "completed" for c in model.components.values()
            )
            assert self.reader.all_components_completed(asset_id) == complete
        summaries = {a.asset_id: a for a in self.reader.list_assets()}
        for asset_id, model in self.model.items():
            s = summaries[asset_id]
            assert s.component_count == len(model.components)
            assert s.completed_count == sum(
                c.state == "completed" for c in model.components.values()
            )


TrackerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
test_tracker_state_machine = TrackerMachine.TestCase
