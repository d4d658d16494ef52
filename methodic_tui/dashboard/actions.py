"""Every operator action once: its keys, footer label, palette title and help.

The key bindings, the command palette and the help screen are all built from this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActionSpec:
    action: str  # the App's action_<name>
    keys: str  # Textual key names, comma-separated; "" for palette-only actions
    key_display: str
    label: str  # in the footer
    title: str  # in the command palette and the help screen
    help: str
    show: bool = True  # in the footer
    group: str | None = None  # footer group (keys shown together)
    footer_when: str | None = None  # in the footer only while an asset is in this state


ACTIONS: tuple[ActionSpec, ...] = (
    ActionSpec(
        "toggle_pause",
        "p",
        "p",
        "Pause",
        "Pause or resume the selected asset",
        "Stops its transfers now (finished parts stay finished), or starts it again.",
    ),
    ActionSpec(
        "toggle_pause_all",
        "a,P",
        "a",
        "All",
        "Pause or resume every upload",
        "Pauses everything in flight; when nothing is in flight, resumes the paused ones.",
    ),
    ActionSpec(
        "retry_failed",
        "r",
        "r",
        "Retry",
        "Retry failed uploads",
        "Queues the failed files again (attempts reset); finalizes when all are stored.",
    ),
    ActionSpec(
        "resume_pending",
        "u",
        "u",
        "Resume",
        "Resume uploads an earlier process left",
        "Starts every upload held from an earlier process; only what the server lacks is sent.",
        footer_when="interrupted",
    ),
    ActionSpec(
        "force_finalize",
        "f",
        "f",
        "Finalize",
        "Force-finalize the selected asset",
        "Asks the server to finalize now whatever the tracker says (it still verifies "
        "storage). Asks for confirmation.",
    ),
    ActionSpec(
        "discard",
        "d",
        "d",
        "Discard",
        "Discard the selected asset",
        "Stops it, forgets it locally and deletes the pending asset on the server. "
        "Asks for confirmation.",
    ),
    ActionSpec(
        "bandwidth_up",
        "plus,equals_sign",
        "+",
        "Cap+",
        "Raise the bandwidth cap",
        "One step up (1-2-5 MB/s ...); above 5 GB/s the cap is lifted. - undoes it.",
        group="Cap",
    ),
    ActionSpec(
        "bandwidth_down",
        "minus",
        "-",
        "Cap-",
        "Lower the bandwidth cap",
        "One step down; from no cap, the step below the current rate. + undoes it.",
        group="Cap",
    ),
    ActionSpec(
        "details",
        "enter",
        "enter",
        "Details",
        "Show the selected asset's details",
        "Every file of the asset with its parts, attempts and last error.",
    ),
    ActionSpec(
        "filter",
        "slash",
        "/",
        "Filter",
        "Filter the assets",
        "Type part of a name, state or type; enter keeps it, escape clears it.",
    ),
    ActionSpec(
        "recovery",
        "",
        "",
        "",
        "Show uploads an earlier process left unfinished",
        "The recovery screen: resume all or one, discard, force-finalize.",
        show=False,
    ),
    ActionSpec("help", "question_mark", "?", "Help", "Show the keys", "This screen."),
    ActionSpec(
        "request_quit",
        "q,ctrl+q,ctrl+c",
        "q",
        "Quit",
        "Quit",
        "With uploads in flight, says that they stay resumable and asks first.",
    ),
)
