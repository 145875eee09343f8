from fksroute.cli import main

raise SystemExit(main())
