"""The appliance image's recipe (Containerfile), shipped inside the distribution as `appliance.k3s`."""
