"""What the test packages share: offline models, seeded data dirs, real servers and
workers in subprocesses, photos. Test packages import from here, never from each other."""
