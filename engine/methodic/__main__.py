from methodic.server.cli import main

raise SystemExit(main())
