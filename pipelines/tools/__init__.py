"""Tools around the job: sample data in the real formats, the sample HTTP server, the demo driver."""
