from istgt.main import main
raise SystemExit(main())
