from engramlm.cli.main import main

raise SystemExit(main())
