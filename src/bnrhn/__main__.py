from bnrhn.cli import main

raise SystemExit(main())
