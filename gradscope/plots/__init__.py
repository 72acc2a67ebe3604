"""One drawing function per paper figure: tables in, matplotlib figure out (no torch, no models)."""
