"""Pure protocol logic: no I/O, no clocks, no global randomness (see DESIGN.md)."""
