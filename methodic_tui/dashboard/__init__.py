"""The Textual dashboard: the app, its screens, widgets and styles.

Everything that imports ``textual`` (or ``rich``) lives in this package; the modules beside it
(the CLI, the sources, ``--no-ui`` and ``status``) never import it nor load either library.
"""
