-- One PostgreSQL for the local stack: the MLflow backend store and the Airflow metadata database.
CREATE DATABASE mlflow;
CREATE DATABASE airflow;
