//! Packs as objects in an S3-compatible bucket, shared by any number of server processes (issue 13).
