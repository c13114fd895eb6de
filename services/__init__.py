"""The processes the appliance runs: gateway, engines and their supervisor."""
