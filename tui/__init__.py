"""The Textual admin console, a client of the gateway's admin API."""
