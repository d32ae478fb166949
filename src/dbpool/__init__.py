"""dbpool: a PostgreSQL connection pool built from pykka actors."""
