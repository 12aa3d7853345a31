from lavis_xformer.checkpoints.cli import main

raise SystemExit(main())
