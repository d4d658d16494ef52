"""``methodic-tui completion bash``: a bash completion script generated from the parser."""

from __future__ import annotations

import argparse


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = _subparsers(parser)
    cases = "\n".join(
        f'        {name}) opts="{" ".join(_options(p))}" ;;' for name, p in commands.items()
    )
    return f"""# bash completion for methodic-tui; load with:
#   eval "$(methodic-tui completion bash)"
_methodic_tui() {{
    local cur prev cmd opts i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    case "$prev" in
        --tracker|--log-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "{" ".join(commands)} {" ".join(_options(parser))}" -- "$cur"))
        return
    fi
    case "$cmd" in
{cases}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -d -- "$cur"))
    fi
}}
complete -o filenames -F _methodic_tui methodic-tui"""
