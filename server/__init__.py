"""The ZeroMQ front end of ``dbpool serve``."""
