//! The metadata in PostgreSQL, shared by any number of server processes (issue 13).
