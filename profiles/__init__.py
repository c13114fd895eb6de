"""Built-in profiles (YAML), shipped inside the distribution as `appliance.profiles`."""
