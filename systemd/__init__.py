"""systemd unit templates (string.Template), shipped inside the distribution as `appliance.systemd`."""
