from fetcher.cli import main

raise SystemExit(main())
