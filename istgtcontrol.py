from istgt.control.client import main
raise SystemExit(main())
