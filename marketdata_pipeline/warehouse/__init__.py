"""The warehouse: connections, the embedded server, migrations, exact window loads, status."""
