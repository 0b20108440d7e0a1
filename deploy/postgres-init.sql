-- basic-auth's users live in a database of their own, beside MLflow's runs and registry
CREATE DATABASE mlflow_auth OWNER mlflow;
