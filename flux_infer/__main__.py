from flux_infer.cli import main

raise SystemExit(main())
