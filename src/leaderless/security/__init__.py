"""Security: cluster PKI and TLS, authentication and permissions, keys for encryption."""
