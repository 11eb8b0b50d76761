"""Pure scheduling decisions: standard library only, time passed in, no I/O."""
