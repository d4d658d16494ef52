from methodic.cli import main

raise SystemExit(main())
