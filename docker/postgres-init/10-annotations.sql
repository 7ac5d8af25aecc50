-- The annotation store's own database (hooks/annotations.py), owned by the Airflow role.
-- Runs once, when the postgres volume is first initialised.
CREATE DATABASE omeflow_annotations OWNER airflow;
