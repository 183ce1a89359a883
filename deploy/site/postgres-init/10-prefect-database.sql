-- Runs once, when the postgres-data volume is first initialised: the Prefect server's own
-- database beside MLflow's (POSTGRES_DB creates mlflow).
CREATE DATABASE prefect OWNER rfm;
