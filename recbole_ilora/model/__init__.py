"""Plugin models; ``recbole_ilora.utils.get_model`` finds ``<name>.py`` here before RecBole's models."""
