"""The command palette (ctrl+p) offers every operator action of the key table."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from methodic_tui.dashboard.actions import ACTIONS, ActionSpec


class MethodicCommands(Provider):
    def _run(self, spec: ActionSpec) -> None:
        self.app.call_later(self.app.run_action, spec.action)

    def _help(self, spec: ActionSpec) -> str:
        return f"key {spec.key_display}: {spec.help}" if spec.key_display else spec.help

    async def discover(self) -> Hits:
        for spec in ACTIONS:
            yield DiscoveryHit(spec.title, partial(self._run, spec), help=self._help(spec))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for spec in ACTIONS:
            score = matcher.match(spec.title)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(spec.title),
                    partial(self._run, spec),
                    help=self._help(spec),
                )
