"""Quality of bars: validation rules (Pandera), coverage measures and trading calendars."""
