"""Library code shared by the KMDN, CDTG and Classification stage scripts."""
