"""Password schemes, the user database file and the twisted.cred checker."""
