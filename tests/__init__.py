"""latentcrafter tests, mirroring the packages."""
